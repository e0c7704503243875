"""Privacy-utility benchmark: what patient-level and site-level DP cost in AUC and in training time.

On the synthetic consortium (what `make demo` generates), with the demo's configuration, this runs the
federated simulation once per setting and reads each run's final test evaluation and privacy ledger:

* patient level: DP-SGD at every site with target epsilon in {1, 3, 8} at delta 1e-5, and no DP;
* site level: Flower's server-side fixed-clipping wrapper at a few noise multipliers (no patient DP);

then times local training steps of one site with and without DP-SGD (same model, data and batch size).
Results go to one JSON file (settings, per-site and pooled test AUC, the ledger's epsilons, step times, the
exact command, software versions) and a Markdown table is printed.

    .venv/bin/python benchmarks/bench_privacy.py --data data/consortium --out benchmarks/results/privacy.json

Each simulation takes minutes on 2 CPU cores; `--patient-eps` / `--site-noise` / `--rounds` trim the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import carry_earlier, provenance, write_result  # noqa: E402
from _seeds import DEFAULT_EVALUATION_SEEDS  # noqa: E402


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import flwr
    import opacus
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
            "flwr": flwr.__version__, "dp-accounting": version("dp-accounting"),
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads())}


def _setting_config(base: Any, *, name: str, patient_eps: float | None, site_noise: float | None,
                    site_clip: float, rounds: int | None, seed: int | None = None) -> Any:
    from fl_server.config import parse_config

    data = base.model_dump(mode="json")
    data["name"] = name
    # One pass per round, as the published privacy results were measured (and patient-level DP-SGD needs).
    fed = base.federation
    data["federation"].update(rounds_per_epoch=1, rounds=rounds or fed.rounds // fed.rounds_per_epoch, eval_every=1)
    if seed is not None:
        data["train"]["seed"] = seed
    data["privacy"]["patient"].update(enabled=patient_eps is not None, target_epsilon=patient_eps,
                                      noise_multiplier=None)
    data["privacy"]["site"].update(enabled=site_noise is not None)
    if site_noise is not None:
        data["privacy"]["site"].update(clipping="server-fixed", noise_multiplier=site_noise, clipping_norm=site_clip)
    return parse_config(data, source=f"benchmark setting {name}")


def _run(exp: Any, data: Path, workdir: Path) -> dict[str, Any]:
    from fl_research.simulation import simulate
    from fl_server.run_dir import RunDirectory

    rd = RunDirectory(workdir / exp.name)
    started = time.perf_counter()
    metrics = simulate(exp, rd, data_root=data)
    seconds = time.perf_counter() - started
    final = metrics.get("final") or {}
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "pooled_test_auc": (final.get("pooled") or {}).get("auc"),
        "site_test_auc": {s: m.get("auc") for s, m in (final.get("sites") or {}).items()},
        "best_val_round": metrics.get("best_round"),
        "train_seconds_per_round": _mean_train_seconds(metrics),
    }
    if rd.privacy_path.is_file():
        ledger = json.loads(rd.privacy_path.read_text())
        last = ledger["rounds"][-1] if ledger["rounds"] else {}
        out["patient_epsilon"] = {s: r.get("epsilon") for s, r in last.get("sites", {}).items()}
        out["patient_noise_multiplier"] = {s: r.get("noise_multiplier") for s, r in last.get("sites", {}).items()}
        server = last.get("server") or {}
        out["site_epsilon"] = server.get("epsilon")
        from fl_server.privacy import PrivacyLedger

        out["guarantee"] = PrivacyLedger.load(rd).guarantee_sentences()
    return out


def _run_with_retry(base: Any, name: str, data: Path, workdir: Path, **setting: Any) -> dict[str, Any]:
    """One simulation; Ray occasionally fails to start on a busy machine, so one fresh try on failure."""
    for attempt in range(2):
        exp = _setting_config(base, name=name + ("-retry" if attempt else ""), **setting)
        try:
            return _run(exp, data, workdir)
        except (RuntimeError, OSError) as exc:
            print(f"[bench] {name}: failed ({exc})", flush=True)
            error = str(exc)
    return {"error": error}


def _summarise(runs: list[dict[str, Any]], eps: float | None, noise: float | None) -> dict[str, Any]:
    """Mean (and spread) over repeated runs of one setting; each run is kept under "runs"."""
    ok = [r for r in runs if isinstance(r.get("pooled_test_auc"), float)]
    aucs = [r["pooled_test_auc"] for r in ok]
    sites = sorted({s for r in ok for s in r.get("site_test_auc", {})})
    summary: dict[str, Any] = {
        "patient_target_epsilon": eps,
        "site_noise_multiplier": noise,
        "repeats": len(runs),
        "pooled_test_auc": round(statistics.mean(aucs), 4) if aucs else None,
        "pooled_test_auc_sd": round(statistics.stdev(aucs), 4) if len(aucs) > 1 else None,
        "site_test_auc": {s: _mean([r["site_test_auc"].get(s) for r in ok]) for s in sites},
        "runs": runs,
    }
    if ok:
        for key in ("patient_epsilon", "site_epsilon", "guarantee"):
            if key in ok[0]:
                summary[key] = ok[0][key]
    return summary


def _mean(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.mean(nums), 4) if nums else None


def _costs(results: dict[str, Any]) -> None:
    """Pooled-AUC cost of each setting against non-private training, paired by seed (same initial model)."""
    ref = results["settings"].get("patient-eps-none")
    if not ref:
        return
    ref_by_seed = {r["seed"]: r.get("pooled_test_auc") for r in ref["runs"]}
    for res in results["settings"].values():
        diffs = [ref_by_seed[r["seed"]] - r["pooled_test_auc"] for r in res["runs"]
                 if isinstance(r.get("pooled_test_auc"), float) and isinstance(ref_by_seed.get(r["seed"]), float)]
        res["pooled_auc_cost_vs_non_private"] = round(statistics.mean(diffs), 4) if diffs else None
        res["pooled_auc_cost_sd"] = round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None


def _mean_train_seconds(metrics: dict[str, Any]) -> float | None:
    values = [m.get("train-seconds") for r in metrics.get("rounds", []) for m in r.get("train", {}).values()]
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.mean(values), 3) if values else None


def step_times(exp: Any, site_dir: Path, *, repeats: int, workdir: Path) -> dict[str, Any]:
    """Seconds per local training step of one site, non-private vs DP-SGD (Opacus), same model and data."""
    import torch

    from fl_client.privacy import PatientDPSession
    from fl_client.settings import SiteSettings
    from shared_model.model.modeling import LLNMNet
    from shared_model.model.training import train_local
    from shared_model.sitedata.cache import build_site_tensors
    from shared_model.sitedata.tensors import LLNMDataset

    pre = exp.preprocess
    tensors = build_site_tensors(site_dir, pre, cache_dir=exp.data.cache_dir, progress=False)
    train = LLNMDataset(tensors.subset("train"))
    model_cfg = exp.architecture()
    cfg = exp.train.model_copy()
    cfg.device = "cpu"
    settings = SiteSettings(data_path=site_dir, name=site_dir.name, cache_dir=None, device="cpu",
                            max_patient_epsilon=None, privacy_state_dir=workdir / "bench-privacy-state")
    pcfg = {"enabled": True, "target_epsilon": None, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
            "accountant": "rdp"}
    rows: dict[str, list[float]] = {"non_private": [], "dp_sgd": []}
    cpu_rows: dict[str, list[float]] = {"non_private": [], "dp_sgd": []}
    threads = torch.get_num_threads()
    # One thread and process CPU time as well as wall time: on a shared machine the CPU seconds a step
    # consumes are far steadier than its wall time.
    torch.set_num_threads(1)
    for rep in range(repeats + 1):  # the first repeat warms up and is discarded
        for kind in rows:
            torch.manual_seed(rep)
            model = LLNMNet(model_cfg)
            hooks = None
            if kind == "dp_sgd":
                session = PatientDPSession.open(site_name=site_dir.name, run_id=f"bench-steps-{rep}",
                                                settings=settings, privacy_cfg=pcfg, n_train=len(train),
                                                batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                                                total_rounds=1, server_round=1)
                hooks = session.hooks()
            cpu0 = time.process_time()
            result = train_local(model, train, cfg, hooks=hooks)
            cpu = time.process_time() - cpu0
            if rep:
                rows[kind].append(result.seconds / max(result.steps, 1))
                cpu_rows[kind].append(cpu / max(result.steps, 1))
    torch.set_num_threads(threads)
    non, dp = statistics.median(rows["non_private"]), statistics.median(rows["dp_sgd"])
    cnon, cdp = statistics.median(cpu_rows["non_private"]), statistics.median(cpu_rows["dp_sgd"])
    return {"site": site_dir.name, "n_train": len(train), "batch_size": cfg.batch_size, "repeats": repeats,
            "torch_threads": 1,
            "seconds_per_step_non_private": round(non, 5), "seconds_per_step_dp_sgd": round(dp, 5),
            "overhead_ratio": round(dp / non, 2),
            "cpu_seconds_per_step_non_private": round(cnon, 5), "cpu_seconds_per_step_dp_sgd": round(cdp, 5),
            "cpu_overhead_ratio": round(cdp / cnon, 2), "wall": rows, "cpu": cpu_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="base experiment (no DP)")
    p.add_argument("--data", default=str(ROOT / "data" / "consortium"), help="synthetic consortium (llnm-synth)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.json"))
    p.add_argument("--patient-eps", default="1,3,8,none", help="patient-level target epsilons; 'none' = no DP")
    p.add_argument("--site-noise", default="0.3,1.0",
                   help="site-level noise multipliers (server-side fixed clipping); empty to skip")
    p.add_argument("--site-clip", type=float, default=1.0, help="site-level clipping norm")
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per setting, with train.seed = the config's seed + 0, 1, ... (costs are paired by seed)")
    p.add_argument("--step-repeats", type=int, default=3, help="timed repeats of the step-time comparison")
    p.add_argument("--workdir", help="where the run directories go (default: a temporary folder)")
    p.add_argument("--profile", choices=["demo", "paper", "heldout"], default="demo",
                   help="'paper': the paper-scale benchmark on one `llnm-synth --profile paper` consortium (--data), "
                        "written to benchmarks/results/privacy_paper_scale.json (benchmarks/_privacy_scale.py); "
                        "'heldout': the same on consortia of --tuning-seeds and --evaluation-seeds, the headline "
                        "from the evaluation seeds only, written to benchmarks/results/privacy_heldout.json "
                        "(benchmarks/_privacy_heldout.py)")
    p.add_argument("--tuning-seeds", default="",
                   help="heldout: consortium seeds a design may have been chosen on (reported apart)")
    p.add_argument("--evaluation-seeds", default=",".join(map(str, DEFAULT_EVALUATION_SEEDS)),
                   help="heldout: consortium seeds no design decision looked at (the headline); "
                        "benchmarks/_seeds.py refuses any other")
    p.add_argument("--patients", type=int, default=9836, help="heldout: patients per consortium")
    p.add_argument("--consortium-profile", default="paper", help="heldout: llnm-synth --profile of the consortia")
    p.add_argument("--data-pattern", default=str(ROOT / "data" / "{profile}-{patients}-s{seed}"),
                   help="heldout: where each seed's consortium is (generated when absent)")
    p.add_argument("--dp-configs", default=str(ROOT / "configs" / "demo-dp.yaml"),
                   help="heldout: the DP designs, comma-separated config files")
    p.add_argument("--epsilons", default="1,3,8", help="paper profile: patient-level target epsilons of the DP design")
    p.add_argument("--seeds", type=int, default=None,
                   help="paper / heldout: runs (noise seeds) per epsilon (default 3 for paper, 1 per consortium "
                        "for heldout)")
    p.add_argument("--full-config", default=str(ROOT / "configs" / "demo.yaml"),
                   help="paper profile: the full model, a non-private candidate")
    p.add_argument("--dp-config", default=str(ROOT / "configs" / "demo-dp.yaml"),
                   help="paper profile: the DP design (also run without DP as a candidate)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paper profile: paired bootstrap draws")
    p.add_argument("--step-time-only", action="store_true",
                   help="keep the simulations already in --out and only (re)measure the step times")
    args = p.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    if args.profile == "heldout":
        from _privacy_heldout import run as run_heldout

        if args.out == p.get_default("out"):
            args.out = str(ROOT / "benchmarks" / "results" / "privacy_heldout.json")
        args.seeds = args.seeds or 1
        return run_heldout(args, made)
    if args.profile == "paper":
        from _privacy_scale import run as run_paper_scale

        args.seeds = args.seeds or 3
        if args.out == p.get_default("out"):
            args.out = str(ROOT / "benchmarks" / "results" / "privacy_paper_scale.json")
        return run_paper_scale(args, made)

    from fl_research.simulation import discover_sites
    from fl_server.config import load_config
    from shared_model.environment import use_offline_environment

    use_offline_environment()
    base = load_config(args.config)
    data = Path(args.data).resolve()
    sites = discover_sites(data, base.data.sites)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-privacy-")).resolve()
    # A private history folder, so that the benchmark never continues another run's accounting.
    os.environ["LLNM_PRIVACY_DIR"] = str(workdir / "privacy-state")
    stamp = time.strftime("%Y%m%d-%H%M%S")

    settings: list[tuple[str, float | None, float | None]] = []
    for tok in [t.strip() for t in args.patient_eps.split(",") if t.strip()]:
        eps = None if tok.lower() == "none" else float(tok)
        settings.append((f"patient-eps-{tok}", eps, None))
    for tok in [t.strip() for t in args.site_noise.split(",") if t.strip()]:
        settings.append((f"site-noise-{tok}", None, float(tok)))

    results: dict[str, Any] = {
        "versions": _versions(),  # beyond "provenance": the libraries and threads the figures depend on
        "base_config": str(Path(args.config).resolve()),
        "data": str(data),
        "sites": [s.name for s in sites],
        "delta": 1e-5,
        "site_clipping_norm": args.site_clip,
        "settings": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.step_time_only:
        # The simulations already in --out are kept, each setting with its own provenance (or, measured before
        # settings recorded theirs, the older file's, carried as "earlier_provenance"); the step times measured
        # now record this run's.
        previous = json.loads(out.read_text())
        for ad_hoc in ("command", "started", "step_time_commands"):  # an older file's, now in "provenance"
            previous.pop(ad_hoc, None)
        carry_earlier(previous, previous, previous.get("settings", {}).values())
        results = previous
        settings = []
    for label, eps, noise in settings:
        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            seed = base.train.seed + rep
            print(f"[bench] {label} (seed {seed}): simulating ...", flush=True)
            res = _run_with_retry(base, f"bench-{label}-s{seed}-{stamp}", data, workdir, patient_eps=eps,
                                  site_noise=noise, site_clip=args.site_clip, rounds=args.rounds, seed=seed)
            res["seed"] = seed
            runs.append(res)
            print(f"[bench] {label} (seed {seed}): pooled test AUC {res.get('pooled_test_auc')} "
                  f"({res.get('seconds', 0):.0f} s)", flush=True)
            results["settings"][label] = _summarise(runs, eps, noise) | {"provenance": made}
            write_result(out, results, made)

    if results["settings"] and not args.step_time_only:
        _costs(results)
    print("[bench] timing local training steps ...", flush=True)
    results["step_time"] = step_times(base, sites[0], repeats=args.step_repeats, workdir=workdir) | {
        "provenance": made}
    results["finished"] = time.strftime("%Y%m%d-%H%M%S")
    write_result(out, results, made)
    print(markdown_table(results))
    print(f"[bench] results: {out.resolve()}")
    return 0


def markdown_table(results: dict[str, Any]) -> str:
    sites = results["sites"]
    head = "| setting | pooled test AUC (mean +- sd) | cost vs no DP (paired) | epsilon (max over sites / site) | " + \
        " | ".join(sites) + " |"
    lines = [head, "|" + "---|" * (4 + len(sites))]
    for label, r in results["settings"].items():
        eps = r.get("patient_epsilon") or {}
        eps_txt = (f"{max(v for v in eps.values() if v is not None):.2f}" if any(v is not None for v in eps.values())
                   else (f"{r['site_epsilon']:.2f} (site)" if r.get("site_epsilon") is not None else "-"))
        cells = [_f(r.get("site_test_auc", {}).get(s)) for s in sites]
        lines.append(f"| {label} | {_pm(r.get('pooled_test_auc'), r.get('pooled_test_auc_sd'))} "
                     f"| {_pm(r.get('pooled_auc_cost_vs_non_private'), r.get('pooled_auc_cost_sd'))} "
                     f"| {eps_txt} | " + " | ".join(cells) + " |")
    st = results.get("step_time")
    if st:
        lines.append("")
        lines.append(f"Step time ({st['site']}, n={st['n_train']}, batch {st['batch_size']}, 1 CPU thread): "
                     f"non-private {st['cpu_seconds_per_step_non_private'] * 1000:.0f} ms, DP-SGD "
                     f"{st['cpu_seconds_per_step_dp_sgd'] * 1000:.0f} ms CPU time per step "
                     f"({st['cpu_overhead_ratio']:.2f}x; wall {st['overhead_ratio']:.2f}x)")
    return "\n".join(lines)


def _pm(mean: Any, sd: Any) -> str:
    return _f(mean) + (f" +- {sd:.3f}" if isinstance(sd, (int, float)) else "")


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(main())
