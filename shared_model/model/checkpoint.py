"""Global-model checkpoints: a safetensors file of the network's state dict plus a JSON side-car.

The side-car (`round-NNNN.json` beside `round-NNNN.safetensors`) holds what the network is (``task``: ``llnm``, an
LLNM-Net, the default, or ``segment``, a nodule and thyroid segmenter), its configuration (``model_config`` or
``segmenter_config``) and the preprocessing configuration it was trained with, so a site can use a checkpoint
without the experiment file, and the SHA-256 of the weights file, so a file that was truncated, damaged or swapped
after it was written is refused rather than used. A checkpoint of one task handed to a command of the other is
refused by name. Both sides use this module: the server writes checkpoints, a site reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from shared_model.fileio import atomic_write, atomic_write_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


#: What a checkpoint's network does (its side-car's ``task``), and the side-car key of its configuration.
TASKS: dict[str, str] = {"llnm": "model_config", "segment": "segmenter_config"}


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = save(tensors, metadata={"format": "llnm-net"})
    atomic_write(path, lambda handle: handle.write(data))
    # The side-car is written second: a side-car always describes a complete weights file.
    atomic_write_json(path.with_suffix(".json"), {**meta, "sha256": hashlib.sha256(data).hexdigest()},
                      indent=2, default=str)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its best round, else its last round)."""
    path = Path(path)
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        best = ckpt_dir / "best.json"
        if best.is_file():
            return ckpt_dir / json.loads(best.read_text(encoding="utf-8"))["checkpoint"]
        rounds = sorted(ckpt_dir.glob("round-*.safetensors"))
        if not rounds:
            raise CheckpointError(f"{path}: no checkpoints found")
        return rounds[-1]
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, side-car metadata) of a checkpoint file or run directory.

    Raises:
        CheckpointError: naming the file: missing, not safetensors, its side-car missing or not JSON or
            without the configurations, or its SHA-256 not the one the side-car recorded when it was written.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    side = path.with_suffix(".json")
    if not side.is_file():
        raise CheckpointError(f"{side}: checkpoint side-car with the model configuration not found")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{side}: not a JSON object")
    task = meta.get("task", "llnm")
    if task not in TASKS:
        raise CheckpointError(f"{side}: unknown task {task!r} (known: {', '.join(TASKS)})")
    for key in (TASKS[task], "preprocess_config"):
        if key not in meta:
            raise CheckpointError(f"{side}: missing '{key}'")
    data = path.read_bytes()
    recorded = meta.get("sha256")  # checkpoints written before the hash was recorded have none
    actual = hashlib.sha256(data).hexdigest() if recorded is not None else None
    if actual != recorded:
        raise CheckpointError(
            f"{path}: SHA-256 {actual[:16]}... is not the {str(recorded)[:16]}... "
            f"recorded in {side.name} when it was written ({len(data)} bytes now): the file was damaged, "
            "truncated or replaced; use another round's checkpoint or copy it again")
    try:
        state = load(data)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    return state, meta


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the network with the checkpoint's weights, side-car metadata).

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the weights are not those of the architecture the
            side-car describes (tensors missing, unexpected or of another shape; the first few are named).
    """
    from shared_model.config import PreprocessConfig
    from shared_model.model.architectures import build_model
    from shared_model.model.configuration import ModelConfig

    path, state, meta = _checkpoint_of_task(path, "llnm")
    try:
        model_cfg = ModelConfig.from_dict(meta["model_config"])
        pre = PreprocessConfig.from_dict(meta["preprocess_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path.with_suffix('.json')}: configuration not usable ({exc})") from None
    model_cfg.check_inputs(pre.inputs, f"checkpoint {path}")
    model = build_model(model_cfg)
    _check_weights(path, model, state, repr(model_cfg.architecture))
    return model, meta


def segmenter_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the segmenter with the checkpoint's weights, side-car metadata).

    Raises:
        CheckpointError: as :func:`load_checkpoint`; an LLNM-Net's checkpoint (refused by name); or weights that
            are not those of the segmenter the side-car describes.
    """
    from shared_model.model.segmenter import SegmenterConfig, build_segmenter

    path, state, meta = _checkpoint_of_task(path, "segment")
    try:
        cfg = SegmenterConfig.from_dict(meta["segmenter_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.with_suffix('.json')}: configuration not usable ({exc})") from None
    model = build_segmenter(cfg)
    _check_weights(path, model, state, "segmenter")
    return model, meta


#: Why a checkpoint of the other task is refused, by the task it is.
_OTHER_TASK = {
    "segment": "a segmenter's checkpoint (task: segment), not an LLNM-Net's: it predicts masks (llnm-site segment), "
               "not LLNM risk",
    "llnm": "an LLNM-Net's checkpoint (task: llnm), not a segmenter's: it predicts LLNM risk; segmenting needs a "
            "checkpoint of a segmentation run (task: segment)",
}


def _checkpoint_of_task(path: str | Path, task: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(file, state, side-car) of a checkpoint whose task is `task`; one of the other task is refused by name."""
    path = resolve_checkpoint(path)
    state, meta = load_checkpoint(path)
    found = meta.get("task", "llnm")
    if found != task:
        raise CheckpointError(f"{path}: {_OTHER_TASK[found]}")
    return path, state, meta


def _check_weights(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], network: str) -> None:
    """Load `state` into `model`, or refuse naming the tensors missing, unexpected or of another shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} tensor(s) {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape ({k}: {list(state[k].shape)}, the architecture's "
                         f"{list(expected[k].shape)})")
        raise CheckpointError(
            f"{path}: its weights are not those of the {network} network its side-car describes: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
