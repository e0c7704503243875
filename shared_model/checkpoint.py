"""Global-model checkpoints: a safetensors file of the LLNMNet state dict plus a JSON side-car.

The side-car (`round-NNNN.json` beside `round-NNNN.safetensors`) holds the model configuration and the
preprocessing configuration the model was trained with, so a site can evaluate a checkpoint without the
experiment file. Both sides use this module: the server writes checkpoints, a site reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from shared_model.fileio import atomic_write, atomic_write_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda handle: handle.write(save(tensors, metadata={"format": "llnm-net"})))
    atomic_write_json(path.with_suffix(".json"), meta, indent=2, default=str)
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
    """(state dict, side-car metadata) of a checkpoint file or run directory."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    side = path.with_suffix(".json")
    if not side.is_file():
        raise CheckpointError(f"{side}: checkpoint side-car with the model configuration not found")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: not valid JSON ({exc})") from None
    for key in ("model_config", "preprocess_config"):
        if key not in meta:
            raise CheckpointError(f"{side}: missing '{key}'")
    return state, meta
