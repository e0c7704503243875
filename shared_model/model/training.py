"""Local training and prediction for LLNM-Net, shared by sites, baselines and benchmarks.

One loop serves three callers: a hospital's ClientApp (one federated round of local epochs,
optionally under DP-SGD), the pooled / local-only baselines, and the benchmarks. Privacy is plugged
in from the outside (`fl_client.privacy`) through `TrainHooks.make_private`, so this module never
decides anything about noise or accounting.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_model.config import TrainConfig
from shared_model.model.loss import patient_stage_probability
from shared_model.model.modeling import LLNMNet, llnm_loss, select_device


def scheduled_lr(cfg: TrainConfig, index: int, total: int) -> float:
    """The learning rate of epoch/round `index` (0-based) of `total` under `cfg.lr_schedule`.

    Cosine: ``lr_min + (lr - lr_min) * (1 + cos(pi * index / (total - 1))) / 2``, so the first epoch or round
    uses `lr` and the last `lr * lr_min_ratio`. A federation passes the round's rate to every site in the
    round config, so sites and baselines follow the same schedule per pass over the data.
    """
    if cfg.lr_schedule == "constant" or total <= 1:
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; known: constant, cosine")
    if not 0 <= index < total:
        raise ValueError(f"schedule index {index} outside 0..{total - 1}")
    low = cfg.lr * cfg.lr_min_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * index / (total - 1)))


@dataclass
class TrainResult:
    """What one call of `train_local` did."""

    loss: float
    num_examples: int
    steps: int
    epochs: int
    seconds: float
    patients_per_second: float
    history: list[float] = field(default_factory=list)


@dataclass
class TrainHooks:
    """Extension points used by DP-SGD (fl_client.privacy) without this module knowing about it.

    `make_private(model, optimizer, loader) -> (model, optimizer, loader)` wraps the three objects
    (e.g. Opacus `PrivacyEngine.make_private`).
    """

    make_private: Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple[Any, Any, Any]] | None = None


def round_part(n: int, parts: int, server_round: int, seed: int, salt: str) -> list[int]:
    """The indices of the training examples that round `server_round` (1-based) trains on when every pass over
    the data is split across `parts` rounds (federation.rounds_per_epoch).

    Rounds (p-1)*parts+1 .. p*parts take the `parts` disjoint, near-equal chunks of one permutation of
    range(n), drawn from (`seed`, pass p, `salt`): every example is used exactly once per pass, in a new
    order each pass. Deterministic, so a site needs no state between rounds (each round is a new process).
    """
    if parts < 1 or server_round < 1:
        raise ValueError(f"round_part: parts={parts} and server_round={server_round} must be >= 1")
    if parts == 1:
        return list(range(n))
    index, part = divmod(server_round - 1, parts)
    key = [int(seed) & 0xFFFFFFFF, index, *salt.encode()]
    order = np.random.default_rng(key).permutation(n)
    return sorted(int(i) for i in order[part * n // parts:(part + 1) * n // parts])


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def _to_device(batch: Iterable[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in batch]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers that travel in federated rounds (the whole LLNMNet: the frozen text
    encoder is not part of it, its outputs are cached on each site's disk)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus' GradSampleModule keeps the original module as `_module`.
    return getattr(model, "_module", model)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_local(
    model: LLNMNet,
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    global_state: dict[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
    hooks: TrainHooks | None = None,
    progress: bool = False,
    description: str = "train",
) -> TrainResult:
    """Train `model` in place on `dataset` for `cfg.local_epochs` epochs.

    FedProx (`proximal_mu` > 0 with the round's `global_state`): mu/2 * ||w - w_global||^2, applied as a
    decoupled step towards the global model after each optimiser step. The global model is public to the
    site, so under DP-SGD this is post-processing and costs no privacy.

    With `hooks.make_private` the data loader, model and optimiser are wrapped for DP-SGD (Opacus
    replaces the loader by a Poisson-sampling one, so "epoch" then means 1/q expected batches).
    """
    hooks = hooks or TrainHooks()
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    model.to(device)
    model.train()
    if len(dataset) == 0:
        return TrainResult(loss=float("nan"), num_examples=0, steps=0, epochs=0, seconds=0.0,
                           patients_per_second=0.0)
    loader = DataLoader(dataset, batch_size=min(cfg.batch_size, len(dataset)), shuffle=True,
                        generator=generator, drop_last=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    private = hooks.make_private is not None
    train_model: nn.Module = model
    if private:
        train_model, optimizer, loader = hooks.make_private(model, optimizer, loader)
    use_amp = cfg.amp and not private and device.type == "cuda"

    prox_ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    if proximal_mu > 0 and global_state is not None:
        named = dict(_unwrap(train_model).named_parameters())
        prox_ref = [(named[k], global_state[k].to(device)) for k in named if k in global_state
                    and named[k].requires_grad]

    start = time.perf_counter()
    steps, seen, total_loss, total_n = 0, 0, 0.0, 0
    history: list[float] = []
    iterator: Any
    for epoch in range(cfg.local_epochs):
        iterator = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{cfg.local_epochs}", leave=False)
        epoch_loss, epoch_n = 0.0, 0
        for batch in iterator:
            if batch[0].shape[0] == 0 and not private:
                continue
            # Under DP-SGD an empty Poisson batch still goes through forward/backward (LLNMNet and llnm_loss
            # accept B = 0): Opacus then has empty per-sample gradients, adds its noise, steps and accounts
            # the step. Skipping it would make the number of releases depend on the data.
            image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage = _to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, use_amp):
                out = train_model(image, view_mask, text, text_mask, clinical, clinical_mask)
                loss, _ = llnm_loss(out, llnm, stage, view_mask, stage_weight=cfg.stage_loss_weight)
            loss.backward()
            if not private and cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if prox_ref:
                with torch.no_grad():
                    step = cfg.lr * proximal_mu
                    for p, g in prox_ref:
                        p.sub_(step * (p - g))
            steps += 1
            n = int(image.shape[0])
            seen += n
            if math.isfinite(loss.item()):
                epoch_loss += loss.item() * n
                epoch_n += n
        history.append(epoch_loss / max(epoch_n, 1))
        total_loss += epoch_loss
        total_n += epoch_n
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(
        loss=total_loss / max(total_n, 1),
        num_examples=len(dataset),
        steps=steps,
        epochs=cfg.local_epochs,
        seconds=seconds,
        patients_per_second=seen / seconds if seconds > 0 else float("nan"),
        history=history,
    )


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser `cfg` names over `params`: AdamW (decoupled weight decay) or SGD with momentum."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict(model: LLNMNet, dataset: Dataset, *, batch_size: int = 64, device: str = "auto") -> dict[str, np.ndarray]:
    """Patient-level LLNM probabilities (mean over present views) and, if the model has the head, the
    risk-stage class probabilities, with the labels carried by the dataset."""
    dev = select_device(device)
    model = _unwrap(model)
    model.to(dev)
    model.eval()
    scores: list[np.ndarray] = []
    stage_probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    stages: list[np.ndarray] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage = _to_device(batch, dev)
        out = model(image, view_mask, text, text_mask, clinical, clinical_mask)
        scores.append(LLNMNet.patient_probability(out, view_mask).float().cpu().numpy())
        stage_prob = patient_stage_probability(out, view_mask)
        if stage_prob is not None:
            stage_probs.append(stage_prob.cpu().numpy())
        labels.append(llnm.cpu().numpy())
        stages.append(stage.cpu().numpy())
    result = {
        "score": np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32),
        "llnm": np.concatenate(labels) if labels else np.zeros(0, dtype=np.float32),
        "stage": np.concatenate(stages) if stages else np.zeros(0, dtype=np.int64),
    }
    if stage_probs:
        result["stage_prob"] = np.concatenate(stage_probs)
    return result
