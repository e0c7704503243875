"""Writing a rendered view as an ultrasound DICOM file, the way the site's scanner would.

Each site has its own vendor strings, photometric interpretation (MONOCHROME2 or RGB), transfer syntax
(explicit or implicit VR little endian, or RLE Lossless) and calibration quirks (a negative
PhysicalDeltaX, an extra non-spatial region, a spectral Doppler region). All UIDs are derived from the
consortium seed, site and patient, and all dates are fixed, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from .profiles import ScannerProfile
from .render import Layout, tint_rgb

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
IMPLEMENTATION_VERSION = "LLNM_SYNTH_1"


#: Namespace of the name-based (version 5) UUIDs behind every synthetic UID.
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/llnm-fl/llnm-synth")


def synthetic_uid(*parts: object) -> str:
    """Deterministic UID from the given parts (seed, site, patient, role): ``2.25.`` + a name-based UUID.

    pydicom's ``generate_uid(prefix=None)`` is random whatever the entropy sources, so it cannot be used for
    byte-identical output; a version 5 UUID under the 2.25 root is standard and reproducible.
    """
    name = "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes of one patient's two images."""

    patient_id: str
    age: int
    sex: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    study_uid: str
    series_uid: str
    institution: str
    accession: str


def _region(
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    *,
    spatial_format: int,
    data_type: int,
    units_x: int,
    units_y: int,
    delta_x: float,
    delta_y: float,
    ref_x: int = 0,
    ref_y: int = 0,
) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0 = c0
    item.RegionLocationMinY0 = r0
    item.RegionLocationMaxX1 = c1 - 1
    item.RegionLocationMaxY1 = r1 - 1
    item.ReferencePixelX0 = ref_x
    item.ReferencePixelY0 = ref_y
    item.PhysicalUnitsXDirection = units_x
    item.PhysicalUnitsYDirection = units_y
    item.ReferencePixelPhysicalValueX = 0.0
    item.ReferencePixelPhysicalValueY = 0.0
    item.PhysicalDeltaX = float(delta_x)
    item.PhysicalDeltaY = float(delta_y)
    return item


def ultrasound_regions(layout: Layout, spacing_mm: float, scanner: ScannerProfile) -> Sequence:
    """SequenceOfUltrasoundRegions: the 2-D tissue region in cm, plus the site's extra regions."""
    r0, r1, c0, c1 = layout.region
    items = []
    if scanner.non_spatial_region:  # whole-frame region without spatial meaning, listed first
        items.append(
            _region(
                0,
                layout.rows,
                0,
                layout.cols,
                spatial_format=0,
                data_type=0,
                units_x=0,
                units_y=0,
                delta_x=1.0,
                delta_y=1.0,
            )
        )
    delta_cm = spacing_mm / 10.0
    items.append(
        _region(
            r0,
            r1,
            c0,
            c1,
            spatial_format=1,
            data_type=1,
            units_x=3,
            units_y=3,
            delta_x=-delta_cm if scanner.negative_delta_x else delta_cm,
            delta_y=delta_cm,
            ref_x=(c0 + c1) // 2,
            ref_y=r0,
        )
    )
    if layout.doppler is not None:  # spectral Doppler strip: seconds across, cm/s down
        d0, d1, e0, e1 = layout.doppler
        items.append(
            _region(
                d0,
                d1,
                e0,
                e1,
                spatial_format=3,
                data_type=3,
                units_x=4,
                units_y=7,
                delta_x=0.004,
                delta_y=-0.9,
                ref_x=e0,
                ref_y=d0 + int((d1 - d0) * 0.7),
            )
        )
    return Sequence(items)


def write_ultrasound_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    layout: Layout,
    spacing_mm: float,
    scanner: ScannerProfile,
    study: StudyInfo,
    view: str,
    instance: int,
    sop_uid: str,
) -> None:
    """Write one view (8-bit grey frame) as a single-frame US image in the site's encoding."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    syntax = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian, "rle": RLELossless}
    if scanner.transfer_syntax not in syntax:
        raise ValueError(f"unknown transfer syntax {scanner.transfer_syntax!r}")
    meta.TransferSyntaxUID = (
        ExplicitVRLittleEndian if scanner.transfer_syntax == "rle" else syntax[scanner.transfer_syntax]
    )

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = ds.SeriesTime = study.study_time
    ds.ContentTime = ds.AcquisitionTime = f"{study.study_time[:4]}{instance * 7 % 60:02d}"
    ds.AccessionNumber = study.accession
    ds.Modality = "US"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "THYROID ULTRASOUND"
    ds.SeriesDescription = "Thyroid B-mode"
    ds.BodyPartExamined = "NECK"
    ds.PatientName = f"SYNTH^{study.patient_id}"
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = study.sex
    ds.PatientAge = f"{int(study.age):03d}Y"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.StudyID = study.accession[-8:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImageComments = "transverse" if view == "trans" else "longitudinal"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SequenceOfUltrasoundRegions = ultrasound_regions(layout, spacing_mm, scanner)

    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if scanner.photometric == "RGB":
        data = tint_rgb(pixels, scanner.tint)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    elif scanner.photometric == "MONOCHROME2":
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    else:
        raise ValueError(f"unsupported photometric interpretation {scanner.photometric!r}")
    if scanner.transfer_syntax == "rle":
        # generate_instance_uid=False: keep our reproducible UID (pydicom would draw a random one)
        ds.compress(RLELossless, data, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = data.tobytes()
    ds.save_as(path, enforce_file_format=True)
