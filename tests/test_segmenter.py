"""The segmenter: its config, its inputs from a site folder, its loss under Opacus, its training and its scores."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.config import TrainConfig
from shared_model.config.base import ConfigError
from shared_model.evaluation.segmentation import predicted_masks, summarise
from shared_model.model.segmenter import STRUCTURES, SegmenterConfig, build_segmenter, segmentation_loss
from shared_model.model.segmenter_data import Sample, SegmentationView, letterbox, nodule_window
from shared_model.model.segmenter_training import predict_frames, train_segmenter
from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs, score_view

SMALL = {"image_size": 32, "features": [4, 4, 8, 8, 16, 4]}


def test_config_presets_and_errors() -> None:
    assert SegmenterConfig.preset("unet-small").image_size == 128
    with pytest.raises(ConfigError, match="unknown segmenter preset 'yolo'"):
        SegmenterConfig.preset("yolo")
    with pytest.raises(ConfigError, match="image_size must be a multiple of 16"):
        SegmenterConfig.from_dict({"image_size": 100})
    with pytest.raises(ConfigError, match="six positive widths"):
        SegmenterConfig.from_dict({"features": [8, 8]})
    with pytest.raises(ConfigError, match="unknown key"):
        SegmenterConfig.from_dict({"depth": 3})


def test_windows_keep_the_shape_and_map_back() -> None:
    box = letterbox(200, 300, 64)
    assert (box.side, box.top, box.left) == (300, -50, 0)
    frame = np.zeros((200, 300), dtype=bool)
    frame[60:140, 100:220] = True  # a 80 x 120 rectangle
    canvas = box.to_canvas(frame, mask=True)
    assert canvas.shape == (64, 64) and canvas[:10].sum() == 0  # the padding stays empty
    back = box.to_frame(canvas) >= 0.5
    assert (back & frame).sum() / (back | frame).sum() > 0.9

    nodule = np.zeros((200, 300), dtype=bool)
    nodule[5:15, 280:296] = True  # 10 x 16 px near the frame's corner
    window = nodule_window(nodule, 64)
    assert window is not None and window.side == 32 and window.top < 0 < window.left
    crop = window.to_canvas(nodule, mask=True)
    assert crop.sum() == 4 * nodule.sum()  # twice the frame's resolution
    assert crop.sum() > 50 * box.to_canvas(nodule, mask=True).sum()  # and far more pixels than in the letterbox
    again = window.to_frame(crop) >= 0.5
    assert (again & nodule).sum() / (again | nodule).sum() > 0.85
    assert nodule_window(np.zeros((8, 8), dtype=bool), 64) is None


def _disk_views(n: int, size: int = 32, seed: int = 0) -> list[SegmentationView]:
    """Views of a bright lobe with a dark nodule, every one drawn (frame = canvas, 0.2 mm pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    views = []
    for i in range(n):
        cy, cx = rng.uniform(10, 22, 2)
        thyroid = ((yy - cy) / 9) ** 2 + ((xx - cx) / 12) ** 2 <= 1
        nodule = (yy - cy) ** 2 + (xx - cx - 2) ** 2 <= rng.uniform(9, 20)
        image = np.where(thyroid, 0.7, 0.2) - 0.4 * nodule + rng.normal(0, 0.05, (size, size))
        image = np.clip(image, 0, 1).astype(np.float32)
        views.append(SegmentationView(
            patient_id=f"P{i}", view="trans", split="train" if i < n - 4 else "test", row=i + 2,
            image_path=Path(f"P{i}.png"),
            whole=Sample(image, np.stack([thyroid, nodule]).astype(np.float32), np.array([True, True])),
            window=letterbox(size, size, size), spacing_mm=(0.2, 0.2), frame=image,
            frame_masks={"thyroid": thyroid, "nodule": nodule}))
    return views


def test_loss_counts_only_drawn_structures_and_gives_per_image_gradients() -> None:
    """An undrawn structure contributes nothing; Opacus' per-sample gradients of the BasicUNet (InstanceNorm,
    interpolation upsampling) equal each image's own gradient."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig.from_dict(SMALL))
    assert ModuleValidator.validate(model, strict=False) == []
    views = _disk_views(3)
    image = torch.stack([torch.from_numpy(v.whole.image)[None] for v in views])
    targets = torch.stack([torch.from_numpy(v.whole.targets) for v in views])
    drawn = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    logits = model(image)
    loss = segmentation_loss(logits, targets, drawn)
    only_nodule = segmentation_loss(logits[1:2], targets[1:2], drawn[1:2])
    changed = targets.clone()
    changed[1, 0] = 1 - changed[1, 0]  # flip the undrawn lobe of image 1: no change
    assert segmentation_loss(logits, changed, drawn).item() == pytest.approx(loss.item())
    assert only_nodule.item() > 0

    gsm = GradSampleModule(model, loss_reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmentation_loss(gsm(image), targets, drawn).backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.remove_hooks()
    for i in range(2):
        model.zero_grad()
        segmentation_loss(model(image[i : i + 1]), targets[i : i + 1], drawn[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(samples[name][i], p.grad, atol=1e-5, rtol=1e-3), (i, name)
    assert all(float(s[2].abs().max()) == 0.0 for s in samples.values())  # nothing drawn: zero gradient


def test_training_learns_the_structures_and_scores_are_exact_for_a_perfect_prediction() -> None:
    torch.manual_seed(0)
    views = _disk_views(40)
    model = build_segmenter(SegmenterConfig.from_dict(SMALL))
    train = [v for v in views if v.split == "train"]
    test = [v for v in views if v.split == "test"]
    def scores(refine: bool) -> dict:
        frames = predict_frames(model, test, refine=refine, device="cpu")
        return summarise([score_view(p, v) for p, v in zip(frames, test, strict=True)])

    before = scores(False)
    result = train_segmenter(model, train, TrainConfig(lr=1e-2, batch_size=8, local_epochs=15, device="cpu"))
    assert result.num_examples == 36 and result.steps == 15 * 5
    after, refined = scores(False), scores(True)
    assert after["thyroid"]["dice"]["mean"] > max(0.85, before["thyroid"]["dice"]["mean"])
    assert refined["nodule"]["n"] == 4 and refined["nodule"]["dice"]["mean"] > 0.5

    perfect = [{name: v.frame_masks[name].astype(np.float32) for name in STRUCTURES} for v in test]
    exact = [score_view(p, v) for p, v in zip(perfect, test, strict=True)]
    for s in exact:
        assert s["thyroid"]["dice"] == pytest.approx(1.0) and s["nodule"]["iou"] == pytest.approx(1.0)
        assert s["thyroid"]["hd95_mm"] == pytest.approx(0.0) and s["capsule_error_mm"] == pytest.approx(0.0)
    empty = score_view({name: np.zeros_like(m) for name, m in perfect[0].items()}, test[0])
    assert empty["nodule"]["dice"] == 0.0 and empty["nodule"]["hd95_mm"] is None and "capsule_error_mm" not in empty
    summary = summarise(exact)
    assert summary["capsule_error_mm"] == {"n": 4, "mean": 0.0, "mean_abs": 0.0, "within_1mm": 1.0}


def test_two_nodules_predicted_keep_the_largest() -> None:
    probs = {"thyroid": np.zeros((32, 32), dtype=np.float32), "nodule": np.zeros((32, 32), dtype=np.float32)}
    probs["nodule"][2:4, 2:4] = 1.0
    probs["nodule"][10:20, 10:20] = 1.0
    assert predicted_masks(probs)["nodule"].sum() == 100


def test_a_site_loads_with_drawn_counts_and_an_unreadable_image_is_reported_by_file_and_row(
        small_consortium: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-a"
    shutil.copytree(small_consortium / "site-a", site)
    inputs = load_segmentation_inputs(site, 64)
    assert inputs.problems == []
    n = len(inputs.views)
    assert inputs.drawn_counts() == {"thyroid": n, "nodule": n}
    first = inputs.views[0]
    assert first.whole.image.shape == (64, 64) and first.whole.targets.shape == (2, 64, 64)
    assert first.spacing_mm is not None and first.whole.targets[1].sum() > 0
    held_out = [v for v in inputs.views if v.split != "train"]
    assert held_out and all(v.frame_masks and v.frame is not None and not v.crops for v in held_out)
    for v in (v for v in inputs.views if v.split == "train"):
        assert not v.frame_masks and v.frame is None and len(v.crops) == 2
        # A nodule window shows the nodule filling a good part of the canvas, whatever its size in the frame.
        assert all(0.03 < c.targets[1].mean() < 0.5 for c in v.crops)

    broken = first.image_path
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated DICOM
    again = load_segmentation_inputs(site, 64)
    assert len(again.views) == n - 1
    assert len(again.problems) == 1
    assert f"images/{broken.name}" in again.problems[0] and f"row {first.row}" in again.problems[0]
