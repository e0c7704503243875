"""Local training and prediction of the segmenter on a site's views (`segmentation_inputs.SegmentationView`).

The same `TrainConfig` as LLNM-Net's (learning rate, weight decay, batch size, epochs, seed, device, clipping). Every
sample of a view (the whole frame and its nodule windows) with at least one drawn structure trains, on the
structures drawn for it (`segmenter.segmentation_loss`). Augmentation is a horizontal flip (masks flip with the
image; left and right lobes look alike) and a random gamma and contrast of the grey values, drawn from the epoch's
seed so that a run is reproducible.

Prediction (`predict_frames`) runs at two scales, as the training does: the whole frame gives the lobe and where the
nodule is; a window around that nodule (`segmentation_inputs.nodule_window`) gives its outline, and the lobe's
boundary near it, at the finer scale.
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
from shared_model.model.segmenter import STRUCTURES, segmentation_loss
from shared_model.model.segmenter_data import Sample, SegmentationView, largest_component, nodule_window
from shared_model.model.training import make_optimizer, select_device

__all__ = ["SegmentationDataset", "SegmenterTrainResult", "predict_frames", "train_segmenter"]


class SegmentationDataset(Dataset):
    """``(image [1, S, S], targets [C, S, S], drawn [C])`` per sample; with ``augment``, flipped and
    re-contrasted from a generator seeded by ``seed``."""

    def __init__(self, samples: Sequence[Sample], augment: bool = False, seed: int = 0) -> None:
        self.samples = list(samples)
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.samples[index]
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
    """`cfg.local_epochs` epochs of AdamW (or SGD) over the samples with something drawn; returns the mean loss
    (`num_examples` counts the views that trained)."""
    trainable = [sample for v in views for sample in v.samples if sample.drawn.any()]
    device = select_device(cfg.device)
    model.to(device)
    model.train()
    if not trainable:
        return SegmenterTrainResult(loss=float("nan"), num_examples=0, steps=0, seconds=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
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
    return SegmenterTrainResult(loss=total / max(seen, 1), num_examples=sum(1 for v in views if v.drawn.any()),
                                steps=steps, seconds=time.perf_counter() - started)


@torch.no_grad()
def _canvas_probabilities(model: nn.Module, canvases: list[np.ndarray], batch_size: int,
                          device: torch.device) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(canvases), batch_size):
        batch = torch.stack([torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))[None]
                             for c in canvases[start : start + batch_size]]).to(device)
        out.extend(torch.sigmoid(model(batch).float()).cpu().numpy())
    return out


def predict_frames(model: nn.Module, views: Sequence[SegmentationView], *, refine: bool = True,
                   batch_size: int = 32, device: str = "auto") -> list[dict[str, np.ndarray]]:
    """Per view, each structure's probability on the frame's own pixels: from the whole frame, and with ``refine``
    from a window around the nodule the whole frame shows (its largest component), which replaces the whole
    frame's probabilities inside that window. Views need their `frame` (views outside the training split)."""
    dev = select_device(device)
    model.to(dev)
    model.eval()
    whole = _canvas_probabilities(model, [v.whole.image for v in views], batch_size, dev)
    frames = [{name: v.window.to_frame(p[i]) for i, name in enumerate(STRUCTURES)} for v, p in zip(views, whole,
                                                                                                   strict=True)]
    if not refine:
        return frames
    windows, which = [], []
    for index, (v, probs) in enumerate(zip(views, frames, strict=True)):
        if v.frame is None:
            raise ValueError(f"{v.image_path}: the view's frame was not kept (a training view): cannot refine")
        coarse = probs["nodule"] >= 0.5
        window = nodule_window(largest_component(coarse), v.window.size) if coarse.any() else None
        if window is not None:
            windows.append(window)
            which.append(index)
    crops = _canvas_probabilities(model, [w.to_canvas(views[i].frame.astype(np.float32), mask=False)
                                          for w, i in zip(windows, which, strict=True)], batch_size, dev)
    for window, index, probs in zip(windows, which, crops, strict=True):
        inside = window.covers()
        for i, name in enumerate(STRUCTURES):
            frames[index][name] = np.where(inside, window.to_frame(probs[i]), frames[index][name])
    return frames
