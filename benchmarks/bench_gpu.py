"""The paper-sized LLNM-Net on one accelerator: training samples/s and peak memory, plain (bf16 autocast and fp32)
and under DP-SGD (Opacus, fp32, as sites run it), through the project's own training loop.

    bash benchmarks/gpu_check.sh                         # on a GPU machine: installs what it needs, then this
    .venv/bin/python benchmarks/bench_gpu.py --cpu --preset tiny --steps 2 --batch 2 --out /tmp/gpu.json

The inputs are synthetic tensors of the model's shapes (two 224x224 views, report token states, per-view
scalars), so nothing but the model and the loop is measured. Each mode runs `--warmup` steps, then `--steps`
timed steps of `--batch` patients through `shared_model.model.training.train_local`. DP-SGD wraps it with Opacus'
`PrivacyEngine.make_private` (noise 1.0, clipping 1.0, fixed-size batches): the ratio dp/plain is per-step
throughput at fp32, which is what a site pays for DP. Writes `--out` (default benchmarks/results/gpu.json; with
`--cpu`, benchmarks/results/gpu-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result  # noqa: E402

from shared_model.config import TrainConfig  # noqa: E402
from shared_model.model.configuration import ModelConfig  # noqa: E402
from shared_model.model.modeling import LLNMNet  # noqa: E402
from shared_model.model.training import TrainHooks, train_local  # noqa: E402


def synthetic(cfg: ModelConfig, n: int, seed: int = 0) -> TensorDataset:
    """`n` patients of random inputs in the model's shapes (both views and the report present)."""
    g = torch.Generator().manual_seed(seed)
    size, length = cfg.image_size, cfg.text_max_length
    return TensorDataset(
        torch.randn(n, 2, cfg.in_channels, size, size, generator=g),
        torch.ones(n, 2),
        torch.randn(n, length, cfg.text_dim, generator=g),
        torch.ones(n, length),
        torch.randn(n, 2, cfg.num_clinical, generator=g),
        torch.ones(n, 2, cfg.num_clinical),
        torch.randint(0, 2, (n,), generator=g).float(),
        torch.randint(0, 3, (n,), generator=g),
    )


def dp_hooks() -> TrainHooks:
    def make_private(model, optimizer, loader):
        from opacus import PrivacyEngine

        return PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False)

    return TrainHooks(make_private=make_private)


def run_mode(cfg: ModelConfig, mode: str, device: str, batch: int, steps: int, warmup: int) -> dict:
    """Samples/s over `steps` timed steps after `warmup` untimed ones, and peak memory."""
    torch.manual_seed(0)
    model = LLNMNet(cfg)
    train_cfg = TrainConfig(batch_size=batch, local_epochs=1, lr=1e-4, device=device, amp=(mode == "plain-bf16"),
                            seed=0)
    hooks = dp_hooks() if mode == "dp-sgd-fp32" else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if warmup:  # kernels, allocator and autotuning warmed on a copy (Opacus hooks a model only once)
        train_local(LLNMNet(cfg), synthetic(cfg, batch * warmup, seed=1), train_cfg,
                    hooks=dp_hooks() if hooks else None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = train_local(model, synthetic(cfg, batch * steps, seed=2), train_cfg, hooks=hooks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"mode": mode, "steps": result.steps, "batch": batch, "seconds": round(seconds, 3),
           "samples_per_second": round(batch * result.steps / seconds, 3), "loss": result.loss}
    if device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (a check of the script; no GPU figures)")
    ap.add_argument("--modes", default="plain-bf16,plain-fp32,dp-sgd-fp32")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch "
              f"{torch.__version__} (a CPU build?); run with --cpu to check the script", file=sys.stderr)
        return 2
    made = provenance()  # the code as it starts, before anything can change the tree
    device = "cpu" if args.cpu else "cuda"
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu-cpu.json" if args.cpu else "gpu.json"))
    cfg = ModelConfig.preset(args.preset)
    modes = [m for m in args.modes.split(",") if m]
    if args.cpu:
        modes = [m for m in modes if m != "plain-bf16"]  # autocast is CUDA-only in the training loop
    runs = []
    for mode in modes:
        print(f"{args.preset} {mode} on {device}: {args.warmup} warm-up + {args.steps} steps of {args.batch}",
              flush=True)
        runs.append(run_mode(cfg, mode, device, args.batch, args.steps, args.warmup))
        print(json.dumps(runs[-1]), flush=True)
    by_mode = {r["mode"]: r for r in runs}
    ratio = None
    if "dp-sgd-fp32" in by_mode and "plain-fp32" in by_mode:
        ratio = round(by_mode["dp-sgd-fp32"]["samples_per_second"] / by_mode["plain-fp32"]["samples_per_second"], 4)
    result = {
        "preset": args.preset,
        "parameters": sum(p.numel() for p in LLNMNet(cfg).parameters()),
        "image_size": cfg.image_size,
        # The device, torch and CUDA are part of the figures: kept here as well as in "provenance".
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "runs": runs,
        "dp_over_plain_fp32": ratio,
        "bf16_over_fp32": (round(by_mode["plain-bf16"]["samples_per_second"]
                                 / by_mode["plain-fp32"]["samples_per_second"], 4)
                           if {"plain-bf16", "plain-fp32"} <= set(by_mode) else None),
    }
    write_result(out, result, made)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
