"""Tests for shared_model.sitedata.imaging on real ultrasound DICOM (../shared, pydicom's own test files) and on
PNG/JPEG/DICOM files written here with PIL and pydicom.

The expected calibrations come from ../shared/data/us_dicom/README.md and are also re-derived from the raw
DICOM tags, so a row/column swap or a missed cm -> mm conversion fails twice.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, pack_bits, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SegmentationStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from fl_client import cmd_inspect
from shared_model.sitedata.imaging import (
    ImageReadError,
    UltrasoundImage,
    inspect_file,
    read_image,
    read_mask,
    select_region,
)

SHARED = Path(os.environ.get("LLNM_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
US_DICOM = SHARED / "data" / "us_dicom"

# name -> transfer syntax, photometric, frames, rows, columns, (row_mm, col_mm) or None, source, region used
EXPECTED = {
    "fodicom_DIRW0007_acuson_mf65_jpegbaseline_ybr422.dcm": (
        "JPEG Baseline (Process 1)", "YBR_FULL_422", 65, 456, 576, (0.52478, 0.52478), "us_region", 1,
    ),
    "fodicom_GH364_philips_iU22_jpegls.dcm": (
        "JPEG-LS Lossless Image Compression", "MONOCHROME2", 1, 768, 1024, None, "none", None,
    ),
    "orthanc_Issue164_ge_voluson_mf87_jpegbaseline.dcm": (
        "JPEG Baseline (Process 1)", "YBR_FULL_422", 87, 743, 975, (0.25939, 0.25939), "us_region", 0,
    ),
    "orthanc_Issue16_hp_mf34_jpegbaseline_doppler_region.dcm": (
        "JPEG Baseline (Process 1)", "YBR_FULL_422", 34, 430, 480, (0.22857, 0.28571), "us_region", 0,
    ),
    "orthanc_atl_jpegbaseline_ybr422_trailing_bytes.dcm": (
        "JPEG Baseline (Process 1)", "YBR_FULL_422", 1, 480, 640, None, "none", None,
    ),
    "orthanc_ge_logiqe_j2k_ybrict.dcm": (
        "JPEG 2000 Image Compression", "YBR_ICT", 1, 965, 1660, (0.047294, 0.047294), "us_region", 0,
    ),
    "orthanc_ge_v830_native_rgb.dcm": (
        "Explicit VR Little Endian", "RGB", 1, 735, 975, (0.13922, 0.13922), "us_region", 0,
    ),
    "orthanc_mindray_rle_ybrfull_planar1.dcm": (
        "RLE Lossless", "YBR_FULL", 1, 910, 1260, (0.14512, 0.14512), "us_region", 0,
    ),
    "orthanc_philips_implicitvr_palette.dcm": (
        "Implicit VR Little Endian", "PALETTE COLOR", 1, 600, 800, (0.16510, 0.16510), "us_region", 0,
    ),
    "pydicomdata_gdcm-US-ALOKA-16_implicit_palette16_3regions.dcm": (
        "Implicit VR Little Endian", "PALETTE COLOR", 1, 480, 640, (0.38265, 0.38265), "us_region", 0,
    ),
}  # fmt: skip

ACUSON = "fodicom_DIRW0007_acuson_mf65_jpegbaseline_ybr422.dcm"
ALOKA = "pydicomdata_gdcm-US-ALOKA-16_implicit_palette16_3regions.dcm"
GH364 = "fodicom_GH364_philips_iU22_jpegls.dcm"
V830 = "orthanc_ge_v830_native_rgb.dcm"
MINDRAY = "orthanc_mindray_rle_ybrfull_planar1.dcm"
YBR_FILES = [n for n, e in EXPECTED.items() if e[1].startswith("YBR_FULL")]

# Ultrasound files bundled inside the installed pydicom package (no download): name -> (row_mm, col_mm) | None
PYDICOM_US_EXPECTED = {
    "examples_palette.dcm": (0.26229, 0.26229),
    "examples_ybr_color.dcm": (0.51050, 0.51050),
    "examples_rgb_color.dcm": None,
    "examples_jpeg2k.dcm": None,
    "ExplVR_BigEnd.dcm": None,
}
_US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # retired
    "1.2.840.10008.5.1.4.1.1.3",  # retired
}


def _pydicom_us_files() -> list[str]:
    """Every ultrasound dataset shipped in the installed pydicom package (headers only, so this is fast)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
            except Exception:
                continue  # pydicom ships deliberately broken files; they are not ultrasound examples
            if ds.get("Modality") == "US" or str(ds.get("SOPClassUID", "")) in _US_SOP_CLASSES:
                found.append(name)
    return sorted(found)


PYDICOM_US_FILES = _pydicom_us_files()


def shared_file(name: str) -> Path:
    path = US_DICOM / name
    if not path.is_file():
        pytest.skip(f"shared ultrasound test data not found at {path} (set LLNM_SHARED_DIR)")
    return path


def _region_spacing_from_tags(path: Path, region_index: int) -> tuple[float, float]:
    """(row_mm, col_mm) straight from the raw tags: rows run along Y, columns along X; cm -> mm."""
    region = pydicom.dcmread(path, stop_before_pixels=True).SequenceOfUltrasoundRegions[region_index]
    assert region.PhysicalUnitsXDirection == 3 and region.PhysicalUnitsYDirection == 3
    return abs(float(region.PhysicalDeltaY)) * 10.0, abs(float(region.PhysicalDeltaX)) * 10.0


def _native_dataset(arr: np.ndarray, photometric: str, bits_stored: int, **attrs: object) -> Dataset:
    """A small native ultrasound dataset built with pydicom (pixel data set by pydicom itself)."""
    ds = Dataset()
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.set_pixel_data(arr, photometric, bits_stored)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


# ----------------------------------------------------------------------------------------------------------
# real ultrasound DICOM from ../shared


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_dicom_decodes_with_readme_calibration(name: str) -> None:
    path = shared_file(name)
    tsyntax, photometric, frames, rows, cols, spacing, source, region = EXPECTED[name]
    before = path.read_bytes()[-4096:]
    image = read_image(path)

    assert isinstance(image, UltrasoundImage)
    assert image.path == path
    assert image.transfer_syntax == tsyntax
    assert image.photometric == photometric
    assert image.frames == frames
    assert image.frame_index == frames // 2
    assert (image.rows, image.columns) == (rows, cols)
    assert image.pixels.shape == (rows, cols)
    assert image.pixels.dtype == np.float32
    assert float(image.pixels.std()) > 5.0, "decoded frame is (nearly) constant"
    lo, hi = image.value_range
    assert lo <= float(image.pixels.min()) and float(image.pixels.max()) <= hi
    assert image.spacing_source == source
    assert image.region_used == region
    if spacing is None:
        assert image.spacing_mm is None
    else:
        assert image.spacing_mm == pytest.approx(spacing, rel=2e-4)
        assert image.spacing_mm == pytest.approx(_region_spacing_from_tags(path, region), rel=1e-9)
        chosen = image.regions[region]
        assert chosen["usable"] and chosen["spatial_format"] == 1
        assert (chosen["row_mm"], chosen["col_mm"]) == image.spacing_mm
    assert path.read_bytes()[-4096:] == before  # reading never writes


@pytest.mark.shared
def test_regions_are_parsed_and_non_tissue_regions_skipped() -> None:
    acuson = read_image(shared_file(ACUSON), frame="first")
    assert [r["spatial_format"] for r in acuson.regions] == [0, 1]
    assert not acuson.regions[0]["usable"] and "not a 2-D tissue region" in acuson.regions[0]["reason"]
    assert acuson.regions[1]["physical_delta_x"] < 0  # negative delta in the file, absolute value used
    assert acuson.regions[1]["col_mm"] > 0

    hp = read_image(shared_file("orthanc_Issue16_hp_mf34_jpegbaseline_doppler_region.dcm"), frame=0)
    doppler = hp.regions[1]
    assert doppler["spatial_format"] == 4 and doppler["units_x_name"] == "seconds"
    assert not doppler["usable"] and doppler["row_mm"] is None
    # the 2-D region is anisotropic: DeltaY (rows) 0.022857 cm, DeltaX (columns) 0.028571 cm
    assert hp.spacing_mm == pytest.approx((0.22857, 0.28571), rel=2e-4)


@pytest.mark.shared
def test_region_hint_selects_among_several_2d_regions() -> None:
    path = shared_file(ALOKA)
    assert read_image(path).region_used == 0  # two equal 2-D regions: ties go to the first
    assert read_image(path, region_hint=(200, 100)).region_used == 0
    right = read_image(path, region_hint=(200.5, 400.0))
    assert right.region_used == 1 and right.regions[1]["min_col"] <= 400 <= right.regions[1]["max_col"]
    assert right.spacing_mm == pytest.approx((0.38265, 0.38265), rel=2e-4)
    assert read_image(path, region_hint=(5, 5)).region_used == 0  # outside all regions: the largest
    moved = select_region(read_image(path), (200.5, 400.0))  # same choice without decoding again
    assert moved.region_used == 1 and moved.spacing_mm == right.spacing_mm
    assert select_region(moved, (200, 100)).region_used == 0
    assert read_image(path).regions[2]["spatial_format"] == 0


@pytest.mark.shared
def test_pixel_spacing_fallback_and_table_spacing() -> None:
    # Issue164 has both a region and PixelSpacing: the region wins; a file without any calibration uses the
    # table only when given one, and the table never overrides the file's own calibration.
    voluson = read_image(shared_file("orthanc_Issue164_ge_voluson_mf87_jpegbaseline.dcm"), frame=0)
    assert voluson.spacing_source == "us_region"
    assert read_image(shared_file(GH364), table_spacing_mm=(0.1, 0.2)).spacing_mm == (0.1, 0.2)
    assert read_image(shared_file(GH364), table_spacing_mm=(0.1, 0.2)).spacing_source == "table"
    calibrated = read_image(shared_file(V830), table_spacing_mm=(0.1, 0.2))
    assert calibrated.spacing_source == "us_region"
    with pytest.raises(ValueError, match="table_spacing_mm"):
        read_image(shared_file(GH364), table_spacing_mm=(0.1, -1.0))


def test_pixel_spacing_used_when_no_region(tmp_path: Path) -> None:
    arr = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    ds = _native_dataset(arr, "MONOCHROME2", 8, PixelSpacing=[0.3, 0.2], ImagerPixelSpacing=[9.0, 9.0])
    path = tmp_path / "ps.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = read_image(path)
    assert image.spacing_source == "pixel_spacing" and image.spacing_mm == (0.3, 0.2)  # (row, col) order
    del ds.PixelSpacing  # ImagerPixelSpacing alone is not a tissue calibration
    ds.save_as(path, enforce_file_format=True)
    assert read_image(path).spacing_source == "none" and read_image(path).spacing_mm is None


@pytest.mark.shared
@pytest.mark.parametrize("name", YBR_FILES)
def test_ybr_is_converted_exactly_once(name: str) -> None:
    """The grey frame must match the file's own Y (luma) channel: converting YBR twice would not."""
    path = shared_file(name)
    image = read_image(path, frame=0)
    raw = pixel_array(path, index=0, raw=True)  # Y, Cb, Cr as stored (422 sub-sampling removed)
    diff = np.abs(raw[..., 0].astype(np.float32) - image.pixels)
    assert float(diff.mean()) < 0.5


@pytest.mark.shared
def test_palette_images_use_the_lookup_table() -> None:
    for name in ("orthanc_philips_implicitvr_palette.dcm", ALOKA):
        path = shared_file(name)
        ds = pydicom.dcmread(path)
        rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        image = read_image(path)
        assert image.value_range == (0.0, 65535.0)  # 16-bit palette entries
        np.testing.assert_allclose(image.pixels, luma, rtol=1e-5, atol=0.5)


@pytest.mark.shared
def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    source = shared_file(GH364)
    data = source.read_bytes()
    assert data.count(b"MONOCHROME2") == 1
    inverted = tmp_path / "mono1.dcm"
    inverted.write_bytes(data.replace(b"MONOCHROME2", b"MONOCHROME1"))
    a, b = read_image(source), read_image(inverted)
    assert b.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(b.pixels, 255.0 - a.pixels)


def test_monochrome_bit_depth_rescale_and_inversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4096, size=(24, 32), dtype=np.uint16)
    path = tmp_path / "m1_12bit.dcm"
    _native_dataset(arr, "MONOCHROME1", 12).save_as(path, enforce_file_format=True)
    image = read_image(path)
    assert image.value_range == (0.0, 4095.0)
    np.testing.assert_array_equal(image.pixels, 4095.0 - arr)

    arr8 = rng.integers(0, 256, size=(24, 32), dtype=np.uint8)
    path = tmp_path / "rescaled.dcm"
    _native_dataset(arr8, "MONOCHROME2", 8, RescaleSlope=2, RescaleIntercept=10).save_as(
        path, enforce_file_format=True
    )
    image = read_image(path)
    assert image.value_range == (10.0, 520.0)
    np.testing.assert_array_equal(image.pixels, arr8 * 2.0 + 10.0)


@pytest.mark.shared
def test_native_ybr_full_written_here(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    src = shared_file(V830)
    reference = read_image(src)
    ds = pydicom.dcmread(src)
    ds.PixelData = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    path = tmp_path / "ybr_full.dcm"
    ds.save_as(path)
    image = read_image(path)
    assert image.photometric == "YBR_FULL"
    assert float(np.abs(image.pixels - reference.pixels).max()) < 1.0


def test_implicit_vr_without_preamble_is_read(tmp_path: Path) -> None:
    arr = (np.arange(30 * 40).reshape(30, 40) % 4096).astype(np.uint16)
    ds = _native_dataset(arr, "MONOCHROME2", 12)
    del ds.file_meta
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_image(path)
    assert image.transfer_syntax == "Implicit VR Little Endian"
    np.testing.assert_array_equal(image.pixels, arr)


# ----------------------------------------------------------------------------------------------------------
# pydicom's own ultrasound test files


def test_pydicom_ships_the_expected_ultrasound_files() -> None:
    names = {Path(p).name for p in PYDICOM_US_FILES}
    assert set(PYDICOM_US_EXPECTED) <= names


@pytest.mark.parametrize("path", PYDICOM_US_FILES, ids=lambda p: Path(p).name)
def test_pydicom_ultrasound_files_decode(path: str) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image = read_image(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    assert image.frames == frames and image.frame_index == frames // 2
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    assert image.photometric == ds.PhotometricInterpretation
    assert float(image.pixels.std()) > 1.0
    name = Path(path).name
    if name in PYDICOM_US_EXPECTED:
        expected = PYDICOM_US_EXPECTED[name]
        if expected is None:
            assert image.spacing_mm is None and image.spacing_source == "none"
        else:
            assert image.spacing_source == "us_region"
            assert image.spacing_mm == pytest.approx(expected, rel=2e-4)
    if image.region_used is not None:
        assert image.spacing_mm == pytest.approx(_region_spacing_from_tags(Path(path), image.region_used))


def test_big_endian_planar_rgb_matches_its_little_endian_twin() -> None:
    big = read_image(get_testdata_file("ExplVR_BigEnd.dcm"))
    ds = pydicom.dcmread(get_testdata_file("ExplVR_BigEnd.dcm"))
    assert ds.PlanarConfiguration == 1
    rgb = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(big.pixels, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# frame choice


@pytest.mark.shared
def test_frame_choice_on_cine() -> None:
    path = shared_file(ACUSON)
    assert read_image(path, frame="first").frame_index == 0
    assert read_image(path, frame="middle").frame_index == 32
    assert read_image(path).frame_index == 32
    last = read_image(path, frame="last")
    assert last.frame_index == 64
    tenth = read_image(path, frame=10)
    assert tenth.frame_index == 10 and read_image(path, frame="10").frame_index == 10
    expected = pixel_array(path, index=10).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(tenth.pixels, expected, atol=1e-3)
    assert not np.array_equal(tenth.pixels, last.pixels)

    for bad in (65, 1000, -1):
        with pytest.raises(ImageReadError, match="out of range") as info:
            read_image(path, frame=bad)
        assert str(path) in str(info.value) and "65 frame" in str(info.value)
    with pytest.raises(ValueError, match="frame must be"):
        read_image(path, frame="centre")


@pytest.mark.shared
def test_single_frame_file_has_only_frame_zero() -> None:
    path = shared_file(V830)
    assert read_image(path, frame="last").frame_index == 0
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=1)


# ----------------------------------------------------------------------------------------------------------
# PNG / JPEG images


def _gradient(rows: int = 40, cols: int = 60) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    return ((r * 3 + c * 2) % 256).astype(np.uint8)


def test_png_grey_8_and_16_bit_with_table_spacing(tmp_path: Path) -> None:
    grey = _gradient()
    Image.fromarray(grey).save(tmp_path / "g8.png")
    image = read_image(tmp_path / "g8.png", table_spacing_mm=(0.1, 0.12))
    np.testing.assert_array_equal(image.pixels, grey)
    assert image.spacing_mm == (0.1, 0.12) and image.spacing_source == "table"
    assert image.transfer_syntax is None and image.frames == 1 and image.value_range == (0.0, 255.0)
    assert image.file_format == "png" and image.photometric == "MONOCHROME2"

    assert select_region(image, (1, 1)) is image  # table calibration is never replaced by a region
    uncalibrated = read_image(tmp_path / "g8.png")
    assert uncalibrated.spacing_mm is None and uncalibrated.spacing_source == "none"

    deep = (grey.astype(np.uint16) * 257 + 3).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "g16.png")
    image16 = read_image(tmp_path / "g16.png", table_spacing_mm=[0.2, 0.2])
    np.testing.assert_array_equal(image16.pixels, deep)
    assert image16.value_range == (0.0, 65535.0) and float(image16.pixels.max()) > 255


def test_png_and_jpeg_colour_become_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    np.testing.assert_allclose(image.pixels, rgb.astype(np.float64) @ [0.299, 0.587, 0.114], atol=1e-3)
    assert image.photometric == "RGB"

    rgba = np.dstack([rgb, np.zeros((32, 48), np.uint8)])  # alpha 0 everywhere: ignored
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c_alpha.png")
    np.testing.assert_allclose(read_image(tmp_path / "c_alpha.png").pixels, image.pixels)

    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    jpeg = read_image(tmp_path / "c.jpg", table_spacing_mm=(0.05, 0.05))
    pil_luma = np.asarray(Image.open(tmp_path / "c.jpg").convert("L"), dtype=np.float32)  # ITU-R 601-2
    assert float(np.abs(jpeg.pixels - pil_luma).max()) <= 1.0
    assert jpeg.file_format == "jpeg" and jpeg.spacing_source == "table"

    Image.fromarray(_gradient()).save(tmp_path / "g.jpg", quality=95)
    assert read_image(tmp_path / "g.jpg").pixels.shape == (40, 60)


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.shared
@pytest.mark.parametrize("name", [ACUSON, GH364, V830, MINDRAY, ALOKA])
def test_truncated_dicom_is_an_error_naming_the_file(tmp_path: Path, name: str) -> None:
    data = shared_file(name).read_bytes()
    for fraction in (0.5, 0.95):
        path = tmp_path / f"cut_{fraction}_{name}"
        path.write_bytes(data[: int(len(data) * fraction)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the early end of file
            with pytest.raises(ImageReadError, match="truncated") as info:
                read_image(path)
            assert str(path) in str(info.value)
            with pytest.raises(ImageReadError):
                inspect_file(path)


def test_garbage_empty_missing_and_directory(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="not a DICOM file") as info:
        read_image(garbage)
    assert str(garbage) in str(info.value)
    text = tmp_path / "notes.dcm"
    text.write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(ImageReadError, match=r"notes\.dcm: not a DICOM file"):
        read_image(text)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.dcm: file is empty"):
        read_image(empty)
    with pytest.raises(ImageReadError, match=r"absent\.dcm: file not found"):
        read_image(tmp_path / "absent.dcm")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    png = tmp_path / "cut.png"
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.png")
    png.write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"cut\.png: unreadable or truncated PNG"):
        read_image(png)


def test_missing_pixel_data_no_decoder_and_unsupported_photometric(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[2:5, 2:5] = (200, 100, 50)
    ds = _native_dataset(arr, "RGB", 8)

    no_pixels = copy.deepcopy(ds)
    del no_pixels.PixelData
    path = tmp_path / "nopix.dcm"
    no_pixels.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"nopix\.dcm: DICOM file .*has no Pixel Data"):
        read_image(path)

    mpeg = copy.deepcopy(ds)
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    mpeg["PixelData"].VR = "OB"
    path = tmp_path / "mpeg.dcm"
    mpeg.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"mpeg\.dcm: transfer syntax MPEG2.*no pixel data decoder"):
        read_image(path)

    hsv = copy.deepcopy(ds)
    hsv.PhotometricInterpretation = "HSV"
    path = tmp_path / "hsv.dcm"
    hsv.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"hsv\.dcm: unsupported photometric interpretation 'HSV'"):
        read_image(path)


# ----------------------------------------------------------------------------------------------------------
# masks


def _mask() -> np.ndarray:
    mask = np.zeros((30, 45), dtype=bool)
    mask[5:20, 10:30] = True
    mask[22, 40] = True
    return mask


def test_png_mask_round_trip_in_every_mode(tmp_path: Path) -> None:
    mask = _mask()
    u8 = mask.astype(np.uint8)
    variants = {
        "bilevel.png": Image.fromarray(mask),
        "l255.png": Image.fromarray(u8 * 255),
        "l1.png": Image.fromarray(u8),
        "i16.png": Image.fromarray(u8.astype(np.uint16) * 1000),
        "rgb.png": Image.fromarray(np.dstack([u8 * 255, u8 * 0, u8 * 0])),
        "rgba.png": Image.fromarray(np.dstack([u8 * 0, u8 * 0, u8 * 9, np.full_like(u8, 255)]), mode="RGBA"),
        "la_alpha_only.png": None,
    }
    palette = Image.fromarray(u8, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    variants["palette.png"] = palette
    for name, img in variants.items():
        if img is None:
            continue
        img.save(tmp_path / name)
        got = read_mask(tmp_path / name, expected_shape=(30, 45))
        assert got.dtype == bool, name
        np.testing.assert_array_equal(got, mask, err_msg=name)

    # alpha is ignored: a mask drawn only in the alpha channel is empty, and empty is returned, not raised
    alpha_only = np.dstack([np.zeros_like(u8), u8 * 255])
    Image.fromarray(alpha_only, mode="LA").save(tmp_path / "la_alpha_only.png")
    assert not read_mask(tmp_path / "la_alpha_only.png").any()


def test_mask_errors_name_the_file(tmp_path: Path) -> None:
    Image.fromarray(_mask()).save(tmp_path / "m.png")
    with pytest.raises(
        ImageReadError, match=r"m\.png: mask is 30x45 \(rows x columns\) but its image is 45x30"
    ):
        read_mask(tmp_path / "m.png", expected_shape=(45, 30))
    Image.fromarray(_mask().astype(np.uint8) * 255).save(tmp_path / "m.jpg")
    with pytest.raises(ImageReadError, match=r"m\.jpg: JPEG is not accepted for masks"):
        read_mask(tmp_path / "m.jpg")
    (tmp_path / "junk.png").write_bytes(b"not a png at all" * 10)
    with pytest.raises(ImageReadError, match=r"junk\.png"):
        read_mask(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match=r"gone\.png: file not found"):
        read_mask(tmp_path / "gone.png")


def _seg_dataset(
    frames: np.ndarray, segments: list[int], source_frames: list[int], fractional: bool
) -> Dataset:
    """A minimal, standard-shaped DICOM SEG built with pydicom: one per-frame functional group per frame."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.PixelRepresentation = 0
    if fractional:
        ds.SegmentationType = "FRACTIONAL"
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = frames.astype(np.uint8).tobytes()
    else:
        ds.SegmentationType = "BINARY"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = pack_bits(frames.astype(np.uint8))  # bits run on across frame boundaries
    ds.SegmentSequence = Sequence()
    for number in sorted(set(segments)):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = f"segment {number}"
        ds.SegmentSequence.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for segment, source_frame in zip(segments, source_frames, strict=True):
        ident = Dataset()
        ident.ReferencedSegmentNumber = segment
        source = Dataset()
        source.ReferencedSOPClassUID = UltrasoundMultiFrameImageStorage
        source.ReferencedSOPInstanceUID = "1.2.3.4"
        source.ReferencedFrameNumber = source_frame
        derivation = Dataset()
        derivation.SourceImageSequence = Sequence([source])
        group = Dataset()
        group.SegmentIdentificationSequence = Sequence([ident])
        group.DerivationImageSequence = Sequence([derivation])
        ds.PerFrameFunctionalGroupsSequence.append(group)
    return ds


def test_dicom_seg_binary_union_segment_and_frame(tmp_path: Path) -> None:
    a = np.zeros((30, 45), bool)
    a[2:10, 3:12] = True
    b = np.zeros((30, 45), bool)
    b[15:25, 20:40] = True
    c = np.zeros((30, 45), bool)
    c[0, 0] = c[29, 44] = True
    path = tmp_path / "seg.dcm"
    # SEG frame 0: segment 1 on source frame 1; 1: segment 2 on source frame 1; 2: segment 1 on frame 2
    _seg_dataset(np.stack([a, b, c]), [1, 2, 1], [1, 1, 2], fractional=False).save_as(
        path, enforce_file_format=True
    )
    np.testing.assert_array_equal(read_mask(path, expected_shape=(30, 45)), a | b | c)
    np.testing.assert_array_equal(read_mask(path, segment_number=1), a | c)
    np.testing.assert_array_equal(read_mask(path, segment_number=2), b)
    np.testing.assert_array_equal(read_mask(path, frame_index=0), a | b)
    np.testing.assert_array_equal(read_mask(path, frame_index=1, segment_number=1), c)
    assert not read_mask(path, frame_index=5).any()  # no segmentation for that frame: empty, not an error
    with pytest.raises(ImageReadError, match=r"seg\.dcm: DICOM SEG has no frame for segment 7"):
        read_mask(path, segment_number=7)
    with pytest.raises(ImageReadError, match=r"seg\.dcm: mask is 30x45 .* image is 31x45"):
        read_mask(path, expected_shape=(31, 45))


def test_dicom_seg_fractional_threshold(tmp_path: Path) -> None:
    probability = np.zeros((1, 10, 12), dtype=np.uint8)
    probability[0, 2:6, 2:6] = 200  # 0.78: inside
    probability[0, 7, 7] = 100  # 0.39: outside
    probability[0, 8, 8] = 128  # 0.502: inside
    path = tmp_path / "frac.dcm"
    _seg_dataset(probability, [1], [1], fractional=True).save_as(path, enforce_file_format=True)
    got = read_mask(path)
    expected = probability[0] >= 128
    np.testing.assert_array_equal(got, expected)


def test_real_dicom_seg_from_pydicom_and_non_seg_dicom_refused(tmp_path: Path) -> None:
    for name in ("liver_1frame.dcm", "liver_expb_1frame.dcm"):  # little and big endian, 1-bit packed
        mask = read_mask(get_testdata_file(name), expected_shape=(512, 512))
        assert mask.dtype == bool and 1000 < int(mask.sum()) < 512 * 512
    not_seg = tmp_path / "image.dcm"
    _native_dataset(np.zeros((4, 4), np.uint8), "MONOCHROME2", 8).save_as(not_seg, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"image\.dcm: DICOM file is Ultrasound Image Storage, not Segm"):
        read_mask(not_seg)


# ----------------------------------------------------------------------------------------------------------
# inspect and the llnm-site command


@pytest.mark.shared
def test_inspect_file_reports_header_and_pixel_stats() -> None:
    info = inspect_file(shared_file(MINDRAY))
    json.dumps(info)  # JSON-able
    assert info["planar_configuration"] == 1 and info["samples_per_pixel"] == 3
    assert info["bits_allocated"] == 8 and info["photometric"] == "YBR_FULL"
    assert info["modality"] == "US" and info["manufacturer"] == "MINDRAY"
    assert info["transfer_syntax"] == "RLE Lossless"
    assert info["spacing_mm"] == pytest.approx([0.14512, 0.14512], rel=2e-4)
    assert info["spacing_source"] == "us_region" and info["region_used"] == 0
    stats = info["pixel_stats"]
    assert 0 <= stats["min"] < stats["mean"] < stats["max"] <= 255

    aloka = inspect_file(shared_file(ALOKA))
    assert aloka["bits_allocated"] == 16 and aloka["photometric"] == "PALETTE COLOR"
    assert len(aloka["regions"]) == 3


def test_inspect_png(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    info = inspect_file(tmp_path / "g.png")
    assert info["file_format"] == "png" and info["transfer_syntax"] is None
    assert (info["rows"], info["columns"], info["frames"]) == (40, 60, 1)
    assert info["spacing_mm"] is None and info["spacing_source"] == "none"
    assert info["pixel_stats"]["max"] == float(_gradient().max())
    assert info["pixel_stats"]["mean"] == pytest.approx(float(_gradient().mean()))


def _llnm_site() -> list[str]:
    script = Path(sys.executable).with_name("llnm-site")
    if not script.exists():
        pytest.fail(f"llnm-site is not installed next to {sys.executable}: run `pip install -e .`")
    return [str(script)]


@pytest.mark.shared
def test_llnm_site_inspect_subprocess(tmp_path: Path) -> None:
    path = shared_file(ACUSON)
    done = subprocess.run(
        [*_llnm_site(), "inspect", str(path), "--frame", "last"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["frames"] == 65 and info["frame_index"] == 64
    assert (info["rows"], info["columns"]) == (456, 576)
    assert info["spacing_mm"] == pytest.approx([0.52478, 0.52478], rel=2e-4)
    assert info["spacing_source"] == "us_region" and info["region_used"] == 1

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00\x01garbage" * 100)
    failed = subprocess.run(
        [*_llnm_site(), "inspect", str(garbage)], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and str(garbage) in failed.stderr


def test_cmd_inspect_run_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cmd_inspect.add_arguments(parser)
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    assert cmd_inspect.run(parser.parse_args([str(tmp_path / "g.png"), "--frame", "first"])) == 0
    assert json.loads(capsys.readouterr().out)["frame_index"] == 0
    assert cmd_inspect.run(parser.parse_args([str(tmp_path / "g.png"), "--frame", "3"])) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "g.png"), "--frame", "centre"])
