"""Reading real ultrasound images and masks into one grey frame with a physical calibration."""

from shared_model.imaging.dicom import (
    BT601_LUMA,
    FrameSpec,
    ImageReadError,
    SpacingSource,
    UltrasoundImage,
    inspect_file,
    read_image,
    read_mask,
    select_region,
)

__all__ = [
    "BT601_LUMA",
    "FrameSpec",
    "ImageReadError",
    "SpacingSource",
    "UltrasoundImage",
    "inspect_file",
    "read_image",
    "read_mask",
    "select_region",
]
