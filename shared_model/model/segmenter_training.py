"""Local training and prediction of the segmenter on a site's views (`segmentation_inputs.SegmentationView`).

The same `TrainConfig` as LLNM-Net's (learning rate, weight decay, batch size, epochs, seed, device, clipping). Only
views with at least one drawn structure train, each on the structures drawn for it (`segmenter.segmentation_loss`).
Augmentation is a horizontal flip (masks flip with the image; left and right lobes look alike) and a random gamma
and contrast of the grey values, drawn from the epoch's seed so that a run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_model.config import TrainConfig
from shared_model.model.segmenter import segmentation_loss
from shared_model.model.training import select_device
from shared_model.sitedata.segmentation_inputs import SegmentationView

__all__ = ["SegmentationDataset", "SegmenterTrainResult", "predict_segmentation", "train_segmenter"]


class SegmentationDataset(Dataset):
    """``(image [1, S, S], targets [C, S, S], drawn [C])`` per view; with ``augment``, flipped and re-contrasted
    from a generator seeded by ``seed``."""

    def __init__(self, views: Sequence[SegmentationView], augment: bool = False, seed: int = 0) -> None:
        self.views = list(views)
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.views[index]
        image, targets = v.image, v.targets
        if self.augment:
            if self.rng.random() < 0.5:
                image, targets = image[:, ::-1], targets[:, :, ::-1]
            gamma = float(np.exp(self.rng.uniform(-0.3, 0.3)))
            contrast = float(self.rng.uniform(0.8, 1.2))
            image = np.clip(np.power(image, gamma) * contrast, 0.0, 1.0)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
                torch.from_numpy(v.drawn.astype(np.float32)))


@dataclass
class SegmenterTrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def train_segmenter(model: nn.Module, views: Sequence[SegmentationView], cfg: TrainConfig) -> SegmenterTrainResult:
    """`cfg.local_epochs` epochs of AdamW (or SGD) over the views with something drawn; returns the mean loss."""
    trainable = [v for v in views if v.drawn.any()]
    device = select_device(cfg.device)
    model.to(device)
    model.train()
    if not trainable:
        return SegmenterTrainResult(loss=float("nan"), num_examples=0, steps=0, seconds=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    started = time.perf_counter()
    total, seen, steps = 0.0, 0, 0
    for epoch in range(cfg.local_epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 1009 + epoch)
        data = SegmentationDataset(trainable, augment=True, seed=cfg.seed * 1009 + epoch)
        for image, targets, drawn in DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=generator):
            image, targets, drawn = image.to(device), targets.to(device), drawn.to(device)
            opt.zero_grad(set_to_none=True)
            loss = segmentation_loss(model(image), targets, drawn)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(image)
            seen += len(image)
            steps += 1
    model.eval()
    return SegmenterTrainResult(loss=total / max(seen, 1), num_examples=len(trainable), steps=steps,
                                seconds=time.perf_counter() - started)


@torch.no_grad()
def predict_segmentation(model: nn.Module, views: Sequence[SegmentationView], *, batch_size: int = 32,
                         device: str = "auto") -> list[np.ndarray]:
    """Per view, the structures' probabilities on the canvas, ``[C, S, S]`` float32."""
    dev = select_device(device)
    model.to(dev)
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(views), batch_size):
        batch = torch.stack([torch.from_numpy(v.image)[None] for v in views[start : start + batch_size]]).to(dev)
        out.extend(torch.sigmoid(model(batch).float()).cpu().numpy())
    return out
