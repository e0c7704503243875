"""The first stage of LLNM-Net's pipeline: a segmenter of the thyroid lobe and the nodule, with its configuration.

The paper segments the nodule (an optimised YOLO-v8) and the thyroid (U-Net++) before it builds the texture, margin
and location maps. Here one MONAI ``BasicUNet`` predicts both structures from one grey ultrasound frame, as two
sigmoid channels (the nodule lies inside the lobe, so the structures overlap and are not classes of a softmax).
Built on MONAI rather than written out, with InstanceNorm (never BatchNorm, so that the model works with DP-SGD and
with FedAvg on small sites) and non-trainable upsampling (interpolation then convolution: layers Opacus has exact
per-sample gradient rules for).

`SegmenterConfig` sits beside the code that builds it, with named presets, as `ModelConfig` does for LLNM-Net; a
round's ConfigRecord carries its JSON dump and the site validates it with this same model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from shared_model.config.base import ConfigError, Float, Int, Schema

if TYPE_CHECKING:  # the coordinator validates the config without importing torch and MONAI
    from torch import Tensor

__all__ = ["STRUCTURES", "SegmenterConfig", "build_segmenter", "segmentation_loss"]

#: The output channels, in order: the thyroid lobe, then the nodule.
STRUCTURES: tuple[str, ...] = ("thyroid", "nodule")


class SegmenterConfig(Schema):
    """Architecture of the segmenter (MONAI ``BasicUNet``, 2-D, one grey input channel, one channel per structure).

    Attributes:
        image_size: side S of the square input; a frame is letterboxed to S x S (its aspect ratio kept) and the
            prediction mapped back to the frame's own pixels (`shared_model.sitedata.segmentation_inputs`).
        features: BasicUNet's six widths: the five encoder levels, then the last decoder level.
        norm: ``instance`` (InstanceNorm with learned scale and shift) or ``group`` (GroupNorm, ``groups``).
        groups: GroupNorm's group count (every width must be divisible by it).
        dropout: dropout rate inside the convolution blocks.
    """

    WHAT: ClassVar[str] = "segmenter config"

    image_size: Int = Field(128, ge=32, le=1024)
    features: list[Int] = Field(default_factory=lambda: [16, 16, 32, 64, 128, 16])
    norm: Literal["instance", "group"] = "instance"
    groups: Int = Field(8, ge=1)
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)

    #: Named presets: field overrides on top of the defaults.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # About 0.46M parameters at 128 x 128: trains on 2 CPU cores in minutes.
        "unet-small": {},
        # Twice the widths at 256 x 256, for a GPU.
        "unet-256": {"image_size": 256, "features": [32, 32, 64, 128, 256, 32]},
    }

    @field_validator("features")
    @classmethod
    def _six_widths(cls, value: list[int]) -> list[int]:
        if len(value) != 6 or any(v < 1 for v in value):
            raise ValueError(f"features must be six positive widths (five encoder levels, one decoder), got {value}")
        return value

    @field_validator("image_size")
    @classmethod
    def _divisible(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x poolings), got {value}")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.norm == "group" and any(v % self.groups for v in self.features):
            raise ValueError(f"norm=group needs every width in {self.features} divisible by groups={self.groups}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SegmenterConfig:
        """A named preset (``unet-small`` or ``unet-256``), with optional field overrides."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown segmenter preset {name!r}; known presets: {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})


def build_segmenter(config: SegmenterConfig) -> Any:
    """A fresh BasicUNet of `config`: input ``[B, 1, S, S]``, output logits ``[B, len(STRUCTURES), S, S]``."""
    from monai.networks.nets import BasicUNet

    norm: tuple[str, dict[str, Any]] = (("instance", {"affine": True}) if config.norm == "instance"
                                        else ("group", {"num_groups": config.groups}))
    # MONAI's default activation works in place, which Opacus' backward hooks refuse.
    act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": False})
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(STRUCTURES), features=tuple(config.features),
                     act=act, norm=norm, dropout=config.dropout, upsample="nontrainable")


def segmentation_loss(logits: Tensor, targets: Tensor, drawn: Tensor) -> Tensor:
    """Soft Dice plus binary cross-entropy per image and structure (MONAI ``DiceLoss`` on sigmoid outputs), over
    the structures drawn for that image, summed over images and divided by the batch size B.

    ``logits`` and ``targets`` are ``[B, C, S, S]``; ``drawn`` ``[B, C]`` is 1 where the structure's mask was drawn
    for the image (an image may have only its nodule drawn, or only its lobe). Dividing by B, not by the drawn
    count, makes each image's gradient that of its own loss, the ``loss_reduction="mean"`` Opacus assumes; a
    ``0 * logits.sum()`` term keeps every parameter in the graph for a batch with nothing drawn.
    """
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, reduction="none")(logits, targets).flatten(1)  # [B, C]
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(2, 3))  # [B, C]
    drawn = drawn.to(logits.dtype)
    per_image = ((dice + bce) * drawn).sum(dim=1) / drawn.sum(dim=1).clamp(min=1.0)
    return per_image.sum() / max(logits.shape[0], 1) + 0.0 * logits.sum()
