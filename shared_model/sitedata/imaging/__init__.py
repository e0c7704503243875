"""Reading real ultrasound images and masks into one grey frame with a physical calibration.

Hospitals export ultrasound in many ways: DICOM from every vendor (native or compressed, colour or grey,
cine loops, palette images) and, at some sites, plain PNG/JPEG screenshots. The rest of llnm-fl only wants
one thing from a file: a 2-D grey frame plus the size of a pixel in millimetres, or an honest "unknown".
This package turns any of those exports into an :class:`UltrasoundImage` and fails with an
:class:`ImageReadError` that names the file and what is wrong, so that ``llnm-site check`` can report it.

Design choices are documented where they are made (see also ``docs/site-data.md``):

* :mod:`~shared_model.sitedata.imaging.common`: :class:`UltrasoundImage`, :class:`ImageReadError`, telling the formats
  apart by their first bytes (extensions are not trusted) and the choice of a cine frame;
* :mod:`~shared_model.sitedata.imaging.dicom`: decoding one DICOM frame and reducing colour, palette and MONOCHROME
  data to grey;
* :mod:`~shared_model.sitedata.imaging.regions`: the calibration (ultrasound regions, then ``PixelSpacing``; never
  ``ImagerPixelSpacing``) and :func:`select_region`;
* :mod:`~shared_model.sitedata.imaging.pil`: PNG and JPEG images;
* :mod:`~shared_model.sitedata.imaging.masks`: :func:`read_mask` (PNG and DICOM SEG);
* :mod:`~shared_model.sitedata.imaging.reader`: :func:`read_image`, which dispatches on the format;
* :mod:`~shared_model.sitedata.imaging.inspection`: :func:`inspect_file` for ``llnm-site inspect``.
"""

from shared_model.sitedata.imaging.common import BT601_LUMA, FrameSpec, ImageReadError, SpacingSource, UltrasoundImage
from shared_model.sitedata.imaging.inspection import inspect_file
from shared_model.sitedata.imaging.masks import read_mask
from shared_model.sitedata.imaging.reader import read_image
from shared_model.sitedata.imaging.regions import select_region

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
