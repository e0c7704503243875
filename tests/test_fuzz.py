"""Property-based fuzzing (hypothesis) of the readers that take a hospital's files and the coordinator's config.

For any input: it loads, or it fails with our own error type naming what is wrong. Never an unhandled
exception, and never a write into the folder that was read. Example counts are kept small (the suite runs on
two cores); hypothesis' database remembers failures between runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import tree_digest

from fl_server.config import ConfigError, load_config, parse_config
from shared_model.sitedata.contract import load_site
from shared_model.sitedata.imaging.common import ImageReadError
from shared_model.sitedata.imaging.masks import read_mask
from shared_model.sitedata.imaging.reader import read_image

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "us_dicom"


# ---- the experiment configuration ------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(["name", "model", "preset", "federation", "rounds", "min_sites", "train", "lr",
                                  "privacy", "patient", "enabled", "preprocess", "inputs", "clinical", "evaluation",
                                  "explain", "data", "root", "tracking", "backend", "site", "epsilon"]),
                 st.text(max_size=8))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@FUZZ
@given(trees)
def test_any_config_tree_loads_or_is_a_config_error(tree: object) -> None:
    try:
        parse_config(tree, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


@FUZZ
@given(st.binary(max_size=300))
def test_any_config_file_loads_or_is_a_config_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "exp.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)


# ---- the site table ---------------------------------------------------------------------------------------
HEADER = "patient_id,split,llnm,risk_stage,age,sex,report,trans_image,trans_nodule_mask,trans_thyroid_mask"
cells = st.one_of(st.sampled_from(["", "P1", "train", "val", "test", "0", "1", "2", "-1", "45", "F", "M", "x",
                                   "\ufeff", "1e309", "nan", "../../etc/passwd", "images/a.dcm", '"', ",,"]),
                  st.text(max_size=10))
rows = st.lists(st.lists(cells, min_size=0, max_size=12).map(lambda r: ",".join(r)), max_size=6)


@FUZZ
@given(rows=rows, header=st.sampled_from([HEADER, HEADER.replace("llnm,", ""), "", "a,b"]),
       site_yaml=st.one_of(st.none(), trees.map(lambda t: yaml.safe_dump(t)), st.binary(max_size=60)))
def test_any_site_table_loads_with_problems_and_is_never_written(tmp_path_factory: pytest.TempPathFactory,
                                                                 rows: list[str], header: str,
                                                                 site_yaml: object) -> None:
    site = tmp_path_factory.mktemp("site")
    (site / "patients.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    if isinstance(site_yaml, bytes):
        (site / "site.yaml").write_bytes(site_yaml)
    elif site_yaml is not None:
        (site / "site.yaml").write_text(site_yaml, encoding="utf-8")
    before = tree_digest(site)
    result = load_site(site)  # problems are reported, never raised
    assert all(p.file and p.message for p in result.problems)
    assert len(result.patients) <= len(rows)
    assert tree_digest(site) == before


@FUZZ
@given(st.binary(max_size=400))
def test_any_table_bytes_load_with_problems(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    site = tmp_path_factory.mktemp("site")
    (site / "patients.csv").write_bytes(raw)
    result = load_site(site)
    assert result.patients == [] or result.problems is not None


# ---- image and mask files ---------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".dcm", ".png", ".jpg", ""]))
def test_any_bytes_read_as_an_image_or_an_image_read_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes,
                                                           suffix: str) -> None:
    path = tmp_path_factory.mktemp("img") / f"x{suffix}"
    path.write_bytes(raw)
    for reader in (read_image, read_mask):
        try:
            reader(path)
        except ImageReadError as exc:
            assert str(path) in str(exc) or path.name in str(exc)


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/us_dicom (real ultrasound DICOMs) is absent")
@FUZZ
@given(data=st.data())
def test_mutated_real_dicoms_read_or_fail_with_an_image_read_error(tmp_path_factory: pytest.TempPathFactory,
                                                                   data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(sorted(SHARED_DICOM.glob("*.dcm"))))
    raw = bytearray(source.read_bytes())
    cut = data.draw(st.integers(132, len(raw)))  # truncated anywhere after the preamble
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 8))):  # and a few bytes flipped
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("dcm") / source.name
    path.write_bytes(bytes(raw))
    try:
        image = read_image(path)
    except ImageReadError as exc:
        assert source.name in str(exc)
    else:
        assert image.pixels.ndim == 2 and image.pixels.size > 0


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/us_dicom (real ultrasound DICOMs) is absent")
def test_a_dicom_element_with_an_unknown_vr_is_an_image_read_error(tmp_path: Path) -> None:
    """pydicom parses elements lazily: a corrupt VR surfaces at the first access, not at dcmread."""
    source = SHARED_DICOM / "orthanc_Issue16_hp_mf34_jpegbaseline_doppler_region.dcm"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    raw = bytearray(source.read_bytes()[:430])
    raw[427] = 0  # the second byte of the VR of (0008,0016): 'U\x00' is no VR
    path = tmp_path / source.name
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageReadError, match=source.name):
        read_image(path)
