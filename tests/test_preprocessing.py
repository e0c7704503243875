"""Preprocessing (CPDT location map, feature images, scalars) and the per-site tensor cache.

Geometry tests use hand-made masks whose distances can be worked out on paper. Cache tests build real site
folders (llnm-synth, hand-written PNG sites, and real vendor DICOM files from ../shared) and run the real
decoders and the real frozen text encoder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.sitedata.cache import build_site_tensors, default_cache_dir
from shared_model.sitedata.geometry import capsule_distance, capsule_distance_map, location_map, nodule_position
from shared_model.sitedata.preprocessing import (
    LOCATION_THYROID_VALUE,
    MARGIN_BAND_FLOOR,
    PreprocessConfig,
    preprocess_view,
    site_intensity_range,
)
from shared_model.sitedata.tensors import (
    CAPSULE_SCALE_MM,
    CLINICAL_FEATURES,
    SIZE_REF_MM,
    LLNMDataset,
    SiteTensors,
)


def _square_thyroid(size: int = 61, lo: int = 10, hi: int = 51) -> np.ndarray:
    """A 41x41 square thyroid (rows/cols 10..50) in a 61x61 frame: capsule ring at 10 and 50, centre 30."""
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


# ------------------------------------------------------------------------------------------ CPDT geometry


def test_capsule_distance_map_square_known_values() -> None:
    thyroid = _square_thyroid()
    d = capsule_distance_map(thyroid)
    assert d[30, 30] == pytest.approx(20.0)  # the centre point: 20 pixels from the ring at row/col 10
    assert d.max() == pytest.approx(20.0)  # ... and it is d_max
    assert d[10, 30] == 0.0 and d[50, 50] == 0.0  # capsule ring pixels
    assert d[11, 30] == pytest.approx(1.0)
    assert d[13, 14] == pytest.approx(3.0)  # nearest capsule pixel is (10, 14)
    assert d[0, 0] == 0.0 and d[5, 30] == 0.0  # outside the thyroid


def test_location_map_centre_and_touching_nodules() -> None:
    thyroid = _square_thyroid()
    centre = np.zeros_like(thyroid)
    centre[29:32, 29:32] = True
    phi = location_map(thyroid, centre)
    assert phi.dtype == np.float32
    assert phi[30, 30] == pytest.approx(0.0)  # at the central point: minimum risk
    assert phi[29, 30] == pytest.approx(1 - 19 / 20)
    assert phi[29, 29] == pytest.approx(1 - 19 / 20)
    assert phi[~centre].max() == 0.0  # nothing written outside the nodule

    touching = np.zeros_like(thyroid)
    touching[10:14, 28:33] = True  # reaches the capsule ring at row 10
    phi = location_map(thyroid, touching)
    assert phi[10, 30] == pytest.approx(1.0)
    assert phi[13, 30] == pytest.approx(1 - 3 / 20)
    assert capsule_distance(thyroid, touching) == 0.0
    assert capsule_distance(thyroid, centre) == pytest.approx(19.0)


def test_location_map_anisotropic_spacing_in_mm() -> None:
    thyroid = _square_thyroid()
    nodule = np.zeros_like(thyroid)
    nodule[12, 30] = True
    nodule[30, 30] = True
    # Rows are 0.5 mm, columns 0.1 mm: 20 pixels to the side walls is 2 mm, to the top 10 mm.
    d = capsule_distance_map(thyroid, (0.5, 0.1))
    assert d[30, 30] == pytest.approx(2.0)
    assert d.max() == pytest.approx(2.0)
    assert d[12, 30] == pytest.approx(1.0)  # 2 rows above is the top capsule: 1.0 mm < 2.0 mm sideways
    phi = location_map(thyroid, nodule, (0.5, 0.1))
    assert phi[12, 30] == pytest.approx(0.5)
    assert phi[30, 30] == pytest.approx(0.0)
    # Isotropic pixels give a different answer for the same pixel: 2/20 pixels.
    assert location_map(thyroid, nodule)[12, 30] == pytest.approx(1 - 2 / 20)


def test_capsule_distance_rectangle_in_mm_picks_physically_nearest_wall() -> None:
    thyroid = np.zeros((80, 120), dtype=bool)
    thyroid[10:51, 10:91] = True  # rows 10..50, cols 10..90
    nodule = np.zeros_like(thyroid)
    nodule[20:26, 40:51] = True  # rows 20..25, cols 40..50
    # In pixels the top wall (10 rows away) is nearest.
    assert capsule_distance(thyroid, nodule) == pytest.approx(10.0)
    # With 0.4 mm rows and 0.1 mm columns the left wall (30 cols = 3.0 mm) beats the top (10 rows = 4.0 mm).
    assert capsule_distance(thyroid, nodule, (0.4, 0.1)) == pytest.approx(3.0)
    assert capsule_distance(thyroid, nodule, (0.1, 0.4)) == pytest.approx(1.0)


def test_nodule_outside_thyroid_gets_one() -> None:
    thyroid = _square_thyroid()
    nodule = np.zeros_like(thyroid)
    nodule[5:12, 30:33] = True  # crosses the capsule: extrathyroidal extension
    phi = location_map(thyroid, nodule)
    assert np.all(phi[5:10, 30:33] == 1.0)
    assert phi[10, 31] == pytest.approx(1.0)
    assert phi[11, 31] == pytest.approx(1 - 1 / 20)
    assert capsule_distance(thyroid, nodule, (0.1, 0.1)) == 0.0


def test_image_border_is_not_capsule() -> None:
    thyroid = np.zeros((50, 50), dtype=bool)
    thyroid[:30, :40] = True  # cut off by the top and left image edges
    d = capsule_distance_map(thyroid)
    assert d[0, 0] > 0  # the lobe continues beyond the field of view
    assert d[29, 10] == 0.0 and d[10, 39] == 0.0
    assert d[0, 0] == pytest.approx(29.0)


def test_nodule_position_along_the_gland() -> None:
    thyroid = np.zeros((40, 121), dtype=bool)
    thyroid[5:35, 10:111] = True  # columns 10..110: 100 columns centre to centre
    nodule = np.zeros_like(thyroid)
    nodule[10:20, 15:26] = True  # centroid column 20: a tenth of the way from the left end
    assert nodule_position(thyroid, nodule) == pytest.approx(0.1)
    nodule[:] = False
    nodule[10:20, 55:66] = True  # centroid 60: the middle
    assert nodule_position(thyroid, nodule) == pytest.approx(0.5)
    nodule[:] = False
    nodule[10:20, 108:121] = True  # bulges past the right end: clipped to it
    assert nodule_position(thyroid, nodule) == 1.0
    with pytest.raises(ValueError, match="nodule_mask is empty"):
        nodule_position(thyroid, np.zeros_like(thyroid))
    with pytest.raises(ValueError, match="thyroid_mask is empty"):
        nodule_position(np.zeros_like(thyroid), thyroid)


def test_cpdt_rejects_bad_masks() -> None:
    with pytest.raises(ValueError, match="empty"):
        capsule_distance_map(np.zeros((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="fills the whole image"):
        capsule_distance_map(np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="is 5x5 but the image is 61x61"):
        location_map(_square_thyroid(), np.zeros((5, 5), dtype=bool))
    with pytest.raises(ValueError, match="spacing_mm"):
        capsule_distance_map(_square_thyroid(), (0.0, 1.0))


# ------------------------------------------------------------------------------------------ view features


def _extent(channel: np.ndarray, threshold: float) -> tuple[int, int]:
    rows = np.flatnonzero((channel > threshold).any(axis=1))
    cols = np.flatnonzero((channel > threshold).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


@pytest.mark.parametrize(
    ("spacing", "expected_ratio"),
    [(None, 20 / 60), ((0.1, 0.1), 20 / 60), ((0.3, 0.1), 60 / 60)],
)
def test_texture_crop_preserves_physical_aspect_ratio(spacing, expected_ratio) -> None:
    pixels = np.full((200, 240), 20.0, dtype=np.float32)
    nodule = np.zeros(pixels.shape, dtype=bool)
    nodule[90:110, 90:150] = True  # 20 rows x 60 columns
    pixels[nodule] = 220.0
    cfg = PreprocessConfig(image_size=64)
    feats = preprocess_view(pixels, nodule, None, spacing, cfg, (0.0, 255.0))
    assert feats is not None
    height, width = _extent(feats.channels[0], 0.5)
    assert height / width == pytest.approx(expected_ratio, abs=0.04)
    # Larger physical side fills 1 / (1 + 2 * crop_margin) of the crop.
    assert max(height, width) == pytest.approx(64 / 1.5, abs=2)
    assert feats.shape_ratio == pytest.approx(expected_ratio)


def test_shape_ratio_taller_than_wide_and_echogenicity_sign() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.normal(150.0, 5.0, (160, 160)).astype(np.float32)
    thyroid = np.zeros(pixels.shape, dtype=bool)
    thyroid[20:140, 20:140] = True
    nodule = np.zeros(pixels.shape, dtype=bool)
    nodule[50:110, 70:90] = True  # 60 rows deep, 20 columns wide
    pixels[nodule] = rng.normal(50.0, 5.0, int(nodule.sum()))
    pixels[~thyroid] = 10.0
    cfg = PreprocessConfig(image_size=32)
    feats = preprocess_view(pixels, nodule, thyroid, (0.1, 0.1), cfg, (0.0, 200.0))
    assert feats is not None
    assert feats.shape_ratio == pytest.approx(3.0)  # taller than wide
    assert feats.echogenicity == pytest.approx((50 - 150) / 200, abs=0.01)  # hypoechoic: negative
    assert feats.echo_reference == "thyroid"
    assert feats.nodule_area_mm2 == pytest.approx(60 * 20 * 0.01)
    assert feats.capsule_distance_mm == pytest.approx(3.0)  # 30 rows from row 20 at 0.1 mm
    # Physical ratio: same pixels, rows twice as tall -> 6.
    feats2 = preprocess_view(pixels, nodule, thyroid, (0.2, 0.1), cfg, (0.0, 200.0))
    assert feats2 is not None and feats2.shape_ratio == pytest.approx(6.0)
    # Hyperechoic nodule: positive.
    bright = pixels.copy()
    bright[nodule] = 190.0
    feats3 = preprocess_view(bright, nodule, thyroid, (0.1, 0.1), cfg, (0.0, 200.0))
    assert feats3 is not None and feats3.echogenicity > 0.15


def test_location_channel_encodes_phi_and_silhouette() -> None:
    pixels = np.full((200, 200), 100.0, dtype=np.float32)
    thyroid = np.zeros(pixels.shape, dtype=bool)
    thyroid[20:181, 40:161] = True
    centre = np.zeros_like(thyroid)
    centre[95:106, 95:106] = True
    cfg = PreprocessConfig(image_size=64)
    feats = preprocess_view(pixels, centre, thyroid, (0.1, 0.1), cfg, (0.0, 255.0))
    assert feats is not None
    loc = feats.channels[2]
    assert np.any(loc == 0.0) and np.any(np.isclose(loc, LOCATION_THYROID_VALUE))
    assert np.all((loc == 0.0) | np.isclose(loc, LOCATION_THYROID_VALUE) | (loc >= 0.5))
    nodule_px = loc >= 0.5
    assert 5 <= nodule_px.sum() <= 30  # ~11 native pixels -> ~4.4 output pixels per side
    recovered = (loc[nodule_px] - 0.5) / 0.5
    native = location_map(thyroid, centre, (0.1, 0.1))[centre]
    assert recovered.mean() == pytest.approx(native.mean(), abs=0.05)
    assert recovered.max() < 0.2  # central nodule: low phi
    # The thyroid crop keeps the lobe's 161:121 (rows:cols) shape: silhouette extents follow it.
    height, width = _extent(loc, 0.1)
    assert height / width == pytest.approx(161 / 121, abs=0.05)

    touching = np.zeros_like(thyroid)
    touching[20:30, 90:110] = True  # on the capsule
    feats = preprocess_view(pixels, touching, thyroid, (0.1, 0.1), cfg, (0.0, 255.0))
    assert feats is not None and feats.channels[2].max() == pytest.approx(1.0, abs=0.02)

    # A nodule of 2x2 native pixels in a big lobe still shows in the 64x64 location crop.
    tiny = np.zeros_like(thyroid)
    tiny[100:102, 100:102] = True
    feats = preprocess_view(pixels, tiny, thyroid, (0.1, 0.1), cfg, (0.0, 255.0))
    assert feats is not None and (feats.channels[2] >= 0.5).sum() >= 1


def test_margin_channel_band_and_edge_sharpness() -> None:
    from scipy import ndimage

    yy, xx = np.mgrid[:200, :200]
    nodule = (yy - 100) ** 2 + (xx - 100) ** 2 <= 30**2
    sharp = np.where(nodule, 60.0, 180.0).astype(np.float32)
    blurred = ndimage.gaussian_filter(sharp, 12.0)
    cfg = PreprocessConfig(image_size=64, margin_band_mm=1.0)
    f_sharp = preprocess_view(sharp, nodule, None, (0.1, 0.1), cfg, (0.0, 255.0))
    f_blur = preprocess_view(blurred, nodule, None, (0.1, 0.1), cfg, (0.0, 255.0))
    assert f_sharp is not None and f_blur is not None
    margin = f_sharp.channels[1]
    assert margin[32, 32] == 0.0  # nodule centre is far outside the +-1 mm band
    assert margin[0, 0] == 0.0
    assert margin.max() > 0.9  # a sharp, high-contrast edge saturates
    # A blurred (ill-defined) margin never gets a strong edge; the band itself stays visible at the floor.
    assert f_blur.channels[1].max() < 0.5
    ring = (f_blur.channels[1] > 0) & (margin > 0)
    assert ring.sum() > 100
    assert np.median(f_blur.channels[1][ring]) >= MARGIN_BAND_FLOOR


def test_missing_masks_are_not_invented() -> None:
    pixels = np.full((100, 100), 120.0, dtype=np.float32)
    nodule = np.zeros(pixels.shape, dtype=bool)
    nodule[40:60, 40:60] = True
    pixels[nodule] = 60.0
    cfg = PreprocessConfig(image_size=32)
    assert preprocess_view(pixels, None, nodule, (0.1, 0.1), cfg, (0.0, 255.0)) is None
    assert preprocess_view(pixels, np.zeros_like(nodule), None, (0.1, 0.1), cfg, (0.0, 255.0)) is None
    feats = preprocess_view(pixels, nodule, None, None, cfg, (0.0, 255.0))
    assert feats is not None
    assert feats.thyroid_missing and feats.capsule_distance_mm is None
    assert np.all(feats.channels[2] == 0.0)
    assert feats.echo_reference == "ring" and feats.echogenicity == pytest.approx(-60 / 255, abs=1e-4)
    assert not feats.calibrated and feats.nodule_area_mm2 == 400.0  # pixels squared
    assert any("no thyroid mask" in n for n in feats.notes) and any("uncalibrated" in n for n in feats.notes)
    with pytest.raises(ValueError, match="is 100x100 but the image is 50x50"):
        preprocess_view(pixels[:50, :50], nodule, None, None, cfg, (0.0, 255.0))


def test_site_intensity_range_percentiles_and_regions() -> None:
    a = np.arange(10000, dtype=np.float32).reshape(100, 100)
    lo, hi = site_intensity_range([a], (1, 99))
    assert lo == pytest.approx(np.percentile(a, 1), rel=1e-3) and hi == pytest.approx(np.percentile(a, 99), rel=1e-3)
    region = np.zeros_like(a, dtype=bool)
    region[:10] = True  # values 0..999
    lo, hi = site_intensity_range([a], (0, 100), regions=[region], max_samples_per_image=50)
    assert lo == 0.0 and hi <= 999.0
    assert site_intensity_range([a, a * 2], (1, 99)) == site_intensity_range([a, a * 2], (1, 99))
    assert site_intensity_range([np.full((4, 4), 7.0)]) == (7.0, 8.0)
    with pytest.raises(ValueError, match="no image pixels"):
        site_intensity_range([])


def test_config_round_trip_and_fingerprint() -> None:
    cfg = PreprocessConfig.preset("tiny")
    again = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert PreprocessConfig.preset("paper").image_size == 224
    assert PreprocessConfig(crop_margin=0.3).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="image_sise: unknown key"):
        PreprocessConfig.from_dict({"image_sise": 64})
    with pytest.raises(ValueError, match="intensity_percentiles"):
        PreprocessConfig(intensity_percentiles=(99, 1))
    with pytest.raises(ValueError, match="frame"):
        PreprocessConfig(frame="centre")


# ------------------------------------------------------------------------------------------ site tensors


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "llnm_event", "") for r in caplog.records if r.name == "shared_model.sitedata.cache"]


def _write_png_site(root: Path, n: int = 4) -> None:
    """A small PNG site written by hand: calibrated by the table, one lesion per view."""
    rng = np.random.default_rng(1)
    for sub in ("images", "masks", "reports"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pid = f"H{i:03d}"
        row = {"patient_id": pid, "age": str(40 + i), "sex": "FM"[i % 2], "llnm": str(i % 2),
               "risk_stage": "2" if i % 2 else "", "split": ("train", "val")[i % 2],
               "report": f"reports/{pid}.txt"}
        (root / "reports" / f"{pid}.txt").write_text(f"Solid hypoechoic nodule {i}.", encoding="utf-8")
        for view in ("trans", "long"):
            img = rng.normal(140, 10, (120, 160)).clip(0, 255)
            thyroid = np.zeros((120, 160), dtype=bool)
            thyroid[20:100, 20:140] = True
            nodule = np.zeros_like(thyroid)
            nodule[40:60, 50 + 5 * i : 80 + 5 * i] = True
            img[~thyroid] *= 0.2
            img[nodule] -= 70
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{pid}_{view}.png")
            for kind, mask in (("nodule", nodule), ("thyroid", thyroid)):
                Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{pid}_{view}_{kind}.png")
                row[f"{view}_{kind}_mask"] = f"masks/{pid}_{view}_{kind}.png"
            row[f"{view}_image"] = f"images/{pid}_{view}.png"
            row[f"{view}_row_spacing_mm"] = row[f"{view}_col_spacing_mm"] = "0.1"
        rows.append(row)
    with (root / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _rewrite_table(root: Path, edit) -> None:
    with (root / "patients.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fields = list(rows[0])
    for row in rows:
        edit(row)
    with (root / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_bad_records_are_skipped_loudly_and_missing_parts_marked(tmp_path, caplog) -> None:
    site = tmp_path / "site-h"
    _write_png_site(site)
    (site / "images" / "H001_long.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt

    def edit(row: dict[str, str]) -> None:
        if row["patient_id"] == "H002":
            row["long_nodule_mask"] = ""  # view without nodule outline -> missing
            row["trans_thyroid_mask"] = ""  # no thyroid -> location channel empty
            row["report"] = ""
        if row["patient_id"] == "H003":
            row["sex"] = "X"  # invalid row: left out by load_site

    _rewrite_table(site, edit)
    cfg = PreprocessConfig(image_size=32)
    with caplog.at_level(logging.INFO, logger="shared_model.sitedata.cache"):
        tensors = build_site_tensors(site, cfg, cache_dir=tmp_path / "cache", progress=False)
    assert tensors.patient_ids == ["H000", "H002"]
    messages = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "skipping patient H001" in messages and "H001_long.png" in messages
    assert "row 5 of patients.csv" in messages and "sex" in messages
    skipped = tensors.meta["skipped"]
    assert {s["patient_id"] for s in skipped} == {"H001", None}
    h2 = tensors.patient_ids.index("H002")
    assert tensors.view_mask[h2].tolist() == [1.0, 0.0]
    assert torch.all(tensors.image[h2, 1] == 0)
    assert torch.all(tensors.image[h2, 0, 2] == 0)  # no thyroid mask -> empty location channel
    assert torch.isnan(tensors.extras["capsule_distance"][h2, 0])
    # No thyroid mask: capsule distance and position unknown, size still measured (the table calibrates it).
    assert tensors.clinical_mask[h2].tolist() == [[1, 1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0]]
    # Patient H000: nodule rows 40..59, columns 50..79 in a thyroid of rows 20..99, columns 20..139, 0.1 mm
    # pixels: 2 mm from the top capsule row, area 600 px = 6 mm2, centroid column 64.5 of 20..139.
    scalars = dict(zip(CLINICAL_FEATURES, tensors.clinical[0, 0].tolist(), strict=True))
    assert tensors.clinical_mask[0].tolist() == [[1] * 7, [1] * 7]
    assert scalars["capsule_distance"] == pytest.approx(2.0 / CAPSULE_SCALE_MM, rel=1e-5)
    assert scalars["nodule_size"] == pytest.approx(np.log2(2 * np.sqrt(6.0 / np.pi) / SIZE_REF_MM), rel=1e-5)
    assert scalars["nodule_position"] == pytest.approx(2 * (64.5 - 20) / 119 - 1, rel=1e-5)
    assert not tensors.extras["report_present"][h2] and tensors.text_mask[h2].sum() == 0
    assert torch.all(tensors.text[h2] == 0)
    assert tensors.extras["report_present"][0] and tensors.text_mask[0].sum() > 0
    assert any("no nodule mask" in n for n in tensors.extras["view_notes"][h2][1])


def test_a_model_with_other_scalars_is_refused_by_name() -> None:
    from shared_model.config import InputsConfig
    from shared_model.model.configuration import ModelConfig

    inputs = InputsConfig()
    ModelConfig.preset("tiny").check_inputs(inputs, "checkpoint new.safetensors")
    assert len(inputs.feature_names) == len(CLINICAL_FEATURES)
    with pytest.raises(ValueError, match=r"checkpoint old\.safetensors: .*takes 4 per-view scalars.*give 7"):
        ModelConfig.preset("tiny", num_clinical=4).check_inputs(inputs, "checkpoint old.safetensors")
    with pytest.raises(ValueError, match=r"images=True, reports=True but the inputs have images=False"):
        ModelConfig.preset("tiny").check_inputs(InputsConfig(images=False), "round config")


def test_cache_dir_inside_site_is_refused(tmp_path) -> None:
    site = tmp_path / "site-h"
    _write_png_site(site, n=2)
    with pytest.raises(ValueError, match="never writes into a site folder"):
        build_site_tensors(site, PreprocessConfig(image_size=16), cache_dir=site / "cache", progress=False)
    assert not (site / "cache").exists()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LLNM_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLNM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "llnm-fl"


def _shared_dir() -> Path:
    env = os.environ.get("LLNM_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.mark.shared
def test_real_vendor_dicoms_calibrate_capsule_distance(tmp_path) -> None:
    """Real DICOMs: the capsule distance comes out in mm with each file's own region calibration."""
    src = _shared_dir() / "data" / "us_dicom"
    if not src.is_dir():
        pytest.skip(f"real ultrasound DICOM files not found at {src} (set LLNM_SHARED_DIR)")
    files = {
        # name: (rows, cols, row_mm or None)
        "orthanc_philips_implicitvr_palette.dcm": (600, 800, 0.16510),
        "orthanc_atl_jpegbaseline_ybr422_trailing_bytes.dcm": (480, 640, None),
    }
    site = tmp_path / "site-dicom"
    for sub in ("images", "masks"):
        (site / sub).mkdir(parents=True)
    rows = []
    for i, (name, (height, width, _)) in enumerate(files.items()):
        shutil.copyfile(src / name, site / "images" / name)
        thyroid = np.zeros((height, width), dtype=bool)
        thyroid[150:351, 200:501] = True
        nodule = np.zeros_like(thyroid)
        nodule[200:241, 330:371] = True  # 50 rows below the top capsule row 150, 130 columns from the side
        for kind, mask in (("nodule", nodule), ("thyroid", thyroid)):
            Image.fromarray((mask * 255).astype(np.uint8)).save(site / "masks" / f"D{i}_{kind}.png")
        rows.append({
            "patient_id": f"D{i}", "age": "50", "sex": "F", "llnm": "1", "split": "train", "report": "",
            "trans_image": f"images/{name}", "trans_nodule_mask": f"masks/D{i}_nodule.png",
            "trans_thyroid_mask": f"masks/D{i}_thyroid.png",
            "long_image": "", "long_nodule_mask": "", "long_thyroid_mask": "",
        })
    with (site / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = _tree_digest(site)
    tensors = build_site_tensors(site, PreprocessConfig(image_size=32), cache_dir=tmp_path / "c", progress=False)
    assert _tree_digest(site) == before
    assert tensors.patient_ids == ["D0", "D1"]
    assert tensors.view_mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    capsule = tensors.extras["capsule_distance"][:, 0]
    assert capsule[0].item() == pytest.approx(50 * 0.16510, rel=1e-4)  # mm, from the ultrasound region
    assert tensors.extras["calibrated"][:, 0].tolist() == [True, False]
    assert capsule[1].item() == pytest.approx(50.0)  # uncalibrated file: pixels, flagged as such
    assert any("no calibration" in n for n in tensors.extras["view_notes"][1][0])
    assert tensors.clinical[:, 0, 2].tolist() == pytest.approx([1.0, 1.0])  # 41x41 nodule
    # Pixel lengths are not millimetres: the uncalibrated file's capsule distance and size stay unknown.
    capsule_j, size_j = CLINICAL_FEATURES.index("capsule_distance"), CLINICAL_FEATURES.index("nodule_size")
    assert tensors.clinical_mask[:, 0, capsule_j].tolist() == [1.0, 0.0]
    assert tensors.clinical_mask[:, 0, size_j].tolist() == [1.0, 0.0]
    assert tensors.clinical[0, 0, capsule_j].item() == pytest.approx(50 * 0.16510 / CAPSULE_SCALE_MM, rel=1e-4)
    assert torch.isfinite(tensors.image).all() and tensors.image.min() >= 0 and tensors.image.max() <= 1


# ------------------------------------------------------------------------------------------ llnm-synth site


SYNTH_SITE = "site-e"  # 19 patients of the shared consortium: every third of the gland, reports, both views


@pytest.fixture(scope="module")
def synth_build(small_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One site of the shared generated consortium, built once into a fresh cache, with timings."""
    site = small_consortium / SYNTH_SITE
    assert (site / "patients.csv").is_file()
    cache = tmp_path_factory.mktemp("cache")
    cfg = PreprocessConfig(image_size=32)
    digest = _tree_digest(site)
    started = time.perf_counter()
    tensors = build_site_tensors(site, cfg, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - started
    return {"site": site, "cache": cache, "cfg": cfg, "tensors": tensors, "seconds": seconds,
            "digest": digest, "truth": small_consortium / "truth" / f"{SYNTH_SITE}.csv"}


def _table_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["patient_id"]: row for row in csv.DictReader(handle)}


def _table(site: Path) -> dict[str, dict[str, str]]:
    return _table_rows(site / "patients.csv")


def test_synthetic_site_tensors_follow_the_contract(synth_build, caplog) -> None:
    tensors: SiteTensors = synth_build["tensors"]
    site: Path = synth_build["site"]
    table = _table(site)
    n, s = len(tensors), synth_build["cfg"].image_size
    assert n == len(table) and tensors.patient_ids == list(table)
    assert tensors.site == SYNTH_SITE
    shapes = {
        "image": ((n, 2, 3, s, s), torch.float32), "view_mask": ((n, 2), torch.float32),
        "clinical": ((n, 2, 7), torch.float32), "clinical_mask": ((n, 2, 7), torch.float32),
        "llnm": ((n,), torch.float32), "stage": ((n,), torch.int64),
    }
    for name, (shape, dtype) in shapes.items():
        value = getattr(tensors, name)
        assert tuple(value.shape) == shape and value.dtype == dtype, name
    assert tensors.text.dtype == torch.float32 and tensors.text.shape[:2] == (n, tensors.text_mask.shape[1])
    assert tensors.text_mask.shape[1] == synth_build["cfg"].text.max_length
    assert tensors.image.min() >= 0 and tensors.image.max() <= 1 and torch.isfinite(tensors.image).all()

    for k, pid in enumerate(tensors.patient_ids):
        row = table[pid]
        assert tensors.splits[k] == row["split"]
        assert tensors.llnm[k].item() == (float(row["llnm"]) if row["llnm"] else -1.0)
        stage = int(float(row["risk_stage"])) - 1 if row.get("risk_stage") else -1
        assert tensors.stage[k].item() == stage
        assert tensors.clinical[k, 0, 0].item() == pytest.approx((float(row["age"]) - 45.0) / 15.0)
        assert tensors.clinical[k, 0, 1].item() == (1.0 if row["sex"] == "M" else 0.0)
        for v, view in enumerate(("trans", "long")):
            usable = bool(row[f"{view}_image"]) and bool(row[f"{view}_nodule_mask"])
            assert tensors.view_mask[k, v].item() == float(usable), (pid, view)
            assert tensors.clinical_mask[k, v, 2:4].tolist() == ([1.0, 1.0] if usable else [0.0, 0.0])
            if not usable:
                assert torch.all(tensors.image[k, v] == 0)
            has_thyroid = usable and bool(row[f"{view}_thyroid_mask"])
            assert bool(tensors.extras["location_present"][k, v]) == has_thyroid
            # every synthetic frame is calibrated: capsule distance and position exactly where a thyroid is
            assert tensors.clinical_mask[k, v, 4].item() == float(has_thyroid)
            assert tensors.clinical_mask[k, v, 6].item() == float(has_thyroid)
            assert tensors.clinical_mask[k, v, 5].item() == float(usable)
        has_report = bool(row["report"]) and (site / row["report"]).read_text(encoding="utf-8").strip() != ""
        assert bool(tensors.extras["report_present"][k]) == has_report
        assert (tensors.text_mask[k].sum() > 0) == has_report
        if not has_report:
            assert torch.all(tensors.text[k] == 0)
    # Capsule distances agree with the generator's ground truth in the transverse view to within a pixel
    # and a half (we measure to the centre of the capsule ring, the generator to the continuous outline).
    truth = _table_rows(synth_build["truth"])
    checked = 0
    for k, pid in enumerate(tensors.patient_ids):
        if tensors.view_mask[k, 0] and tensors.extras["location_present"][k, 0]:
            spacing = float(truth[pid]["trans_spacing_mm"])
            ours = tensors.extras["capsule_distance"][k, 0].item()
            assert ours == pytest.approx(float(truth[pid]["capsule_trans_mm"]), abs=1.5 * spacing), pid
            checked += 1
    assert checked >= 5
    # In the longitudinal view (cranial on the left) the position tells the nodule's third.
    thirds = {"upper": [], "middle": [], "lower": []}
    for k, pid in enumerate(tensors.patient_ids):
        if tensors.clinical_mask[k, 1, 6]:
            thirds[truth[pid]["third"]].append((tensors.clinical[k, 1, 6].item() + 1) / 2)
    assert all(len(v) >= 2 for v in thirds.values()), {k: len(v) for k, v in thirds.items()}
    # (Nodule centres are drawn at u in [-0.85, -0.4], [-0.3, 0.3], [0.4, 0.85] of the lobe's length; the
    # mask's extent in the scan plane is a little shorter than the lobe, hence the slack.)
    assert max(thirds["upper"]) < 0.35 and min(thirds["lower"]) > 0.65
    assert all(0.2 < p < 0.8 for p in thirds["middle"])
    # The site folder is untouched and the cache lives outside it.
    assert _tree_digest(site) == synth_build["digest"]
    assert list(synth_build["cache"].glob(f"{SYNTH_SITE}-*.pt"))

    # Second call: a cache hit that decodes nothing and loads no encoder, far faster than the build.
    with caplog.at_level(logging.INFO, logger="shared_model.sitedata.cache"):
        started = time.perf_counter()
        again = build_site_tensors(site, synth_build["cfg"], cache_dir=synth_build["cache"], progress=False)
        hit_seconds = time.perf_counter() - started
    events = _events(caplog)
    assert "cache_hit" in events and "cache_build" not in events
    assert hit_seconds < synth_build["seconds"] / 5
    assert torch.equal(again.image, tensors.image) and torch.equal(again.text, tensors.text)
    assert again.patient_ids == tensors.patient_ids

    # The cache file loads with weights_only and round-trips; subsets and the dataset follow the batch order.
    path = next(synth_build["cache"].glob(f"{SYNTH_SITE}-*.pt"))
    raw = torch.load(path, weights_only=True)
    assert raw["format"].startswith("llnm-site-tensors/")
    train = tensors.subset("train")
    assert set(train.splits) <= {"train"} and len(train) == tensors.splits.count("train")
    assert train.extras["capsule_distance"].shape == (len(train), 2)
    dataset = LLNMDataset([train, tensors.subset("val")])
    sample = dataset[0]
    assert len(sample) == 8
    assert tuple(sample[0].shape) == (2, 3, s, s) and sample[6].shape == () and sample[7].dtype == torch.int64
    assert torch.equal(sample[0], train.image[0])


def test_cache_keys_follow_content_and_config(synth_build, tmp_path, caplog) -> None:
    cache = synth_build["cache"]
    cfg = synth_build["cfg"]
    moved = tmp_path / SYNTH_SITE
    shutil.copytree(synth_build["site"], moved)  # new path and inodes, same content and name

    def build(site_cfg: PreprocessConfig = cfg) -> tuple[SiteTensors, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shared_model.sitedata.cache"):
            result = build_site_tensors(moved, site_cfg, cache_dir=cache, progress=False)
        return result, _events(caplog)

    # Stat key misses (new files), content key hits: nothing is rebuilt.
    first, events = build()
    assert events == ["cache_hit"]
    key = first.meta["cache_key"]

    # Rewriting a file with identical bytes changes its ctime but not the content: still a hit.
    report = next(p for p in sorted((moved / "reports").iterdir()) if p.is_file())
    report.write_bytes(report.read_bytes())
    _, events = build()
    assert events == ["cache_hit"]

    # A changed report changes the key and rebuilds; the new text encodes differently.
    index = first.patient_ids.index(report.stem) if report.stem in first.patient_ids else None
    report.write_text("Markedly hypoechoic taller-than-wide nodule with microcalcifications.", encoding="utf-8")
    changed, events = build()
    assert "cache_build" in events and "cache_written" in events
    assert changed.meta["cache_key"] != key
    if index is not None:
        assert not torch.equal(changed.text[index], first.text[index])

    # Another configuration is another cache.
    small = PreprocessConfig(image_size=16)
    other, events = build(small)
    assert "cache_build" in events and other.image.shape[-1] == 16
    assert other.meta["cache_key"] not in (key, changed.meta["cache_key"])

    # A corrupt cache file is rebuilt with a warning, never trusted.
    path = cache / f"{SYNTH_SITE}-{other.meta['cache_key'][:16]}.pt"
    path.write_bytes(b"\x00garbage")
    rebuilt, events = build(small)
    assert "cache_build" in events and torch.equal(rebuilt.image, other.image)
    assert any("unreadable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert SiteTensors.load(path).meta["cache_key"] == other.meta["cache_key"]
    assert not list(moved.rglob("*.pt")) and not list(moved.rglob("*.tmp"))
