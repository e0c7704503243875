"""llnm-synth at the paper's external-test scale: throughput, memory, disk, and the generative effects.

    .venv/bin/python benchmarks/bench_synth.py --patients 9836 --workers 2

Generates a consortium of 7 sites and ``--patients`` patients in total (default 9,836, the size of the
paper's external test set) into a temporary folder (deleted afterwards unless ``--keep DIR``), and
reports: patients written per second, wall time, peak resident memory of this process and of its
largest worker (ru_maxrss of RUSAGE_SELF and RUSAGE_CHILDREN, and each worker's own VmHWM polled from
/proc), disk size and file count; and, measured
on the hidden truth files, the LLNM rate for capsule distance < 2.5 mm vs >= 2.5 mm (the paper: above
72 % below 2.5 mm), the rate by third, per-site size and prevalence, and the Bayes-optimal and
per-modality best AUCs (all patients and test split). Results go to benchmarks/results/synth.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result  # noqa: E402

from fl_research.synthetic import generate_consortium  # noqa: E402

TARGET_CAPSULE_RATE = 0.72


class _ChildPeakMemory(threading.Thread):
    """Polls the peak RSS (VmHWM) of this process's children while they run.

    ``RUSAGE_CHILDREN.ru_maxrss`` is reported too, but on Linux it includes each spawned worker's image of
    the parent between fork and exec, so it cannot be smaller than the parent's size at that moment; VmHWM
    belongs to the worker's own address space, so it measures what a worker really needs.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self._stop_event.wait(self.interval):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    if fields[1] != me:
                        continue
                    for line in (stat.parent / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except (OSError, IndexError, ValueError):
                    continue  # the process ended while we looked

    def stop(self) -> int | None:
        self._stop_event.set()
        self.join()
        return self.peak_kb or None


def _disk_usage(folder: Path) -> tuple[int, int]:
    total, count = 0, 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            total += (Path(dirpath) / name).stat().st_size
            count += 1
    return total, count


def _auc(y: pd.Series, s: pd.Series) -> float | None:
    return round(float(roc_auc_score(y, s)), 4) if y.nunique() == 2 else None


def _truth_figures(out: Path) -> dict:
    """Effects and AUCs recomputed from the truth tables (independently of consortium.json)."""
    frames = []
    for path in sorted((out / "truth").glob("*.csv")):
        df = pd.read_csv(path)
        df["site"] = path.stem
        frames.append(df)
    truth = pd.concat(frames, ignore_index=True)
    close = truth["capsule_mm"] < 2.5
    figures: dict = {
        "n": len(truth),
        "prevalence": round(float(truth["llnm"].mean()), 4),
        "llnm_rate_capsule_lt_2_5mm": round(float(truth.loc[close, "llnm"].mean()), 4),
        "llnm_rate_capsule_ge_2_5mm": round(float(truth.loc[~close, "llnm"].mean()), 4),
        "n_capsule_lt_2_5mm": int(close.sum()),
        "llnm_rate_by_third": {t: round(float(g["llnm"].mean()), 4) for t, g in truth.groupby("third")},
        "sites": {},
        "auc": {},
    }
    for part, frame in (("all", truth), ("test", truth[truth["split"] == "test"])):
        figures["auc"][part] = {"n": len(frame), "bayes": _auc(frame["llnm"], frame["risk"])}
        for m in ("image", "report", "clinical"):
            figures["auc"][part][m] = _auc(frame["llnm"], frame[f"best_{m}"])
    for site, g in truth.groupby("site"):
        figures["sites"][site] = {
            "n": len(g),
            "prevalence": round(float(g["llnm"].mean()), 4),
            "n_test": int((g["split"] == "test").sum()),
            "bayes_auc_all": _auc(g["llnm"], g["risk"]),
            "image_auc_all": _auc(g["llnm"], g["best_image"]),
            "report_auc_all": _auc(g["llnm"], g["best_report"]),
            "clinical_auc_all": _auc(g["llnm"], g["best_clinical"]),
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--patients", type=int, default=9836, help="total patients over the 7 sites (default 9836)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--keep", default=None, help="write the consortium here and keep it (default: temp, deleted)"
    )
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "synth.json"))
    args = p.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree

    tmp = None
    if args.keep:
        out = Path(args.keep)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="llnm-synth-bench-"))
        out = tmp / "consortium"
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 1000 == 0 or done == total:
            rate = done / (time.perf_counter() - started)
            print(f"[bench] {done}/{total} patients ({rate:.1f}/s)", flush=True)

    watcher = _ChildPeakMemory()
    watcher.start()
    try:
        summary = generate_consortium(
            out,
            sites=7,
            patients=args.patients,
            seed=args.seed,
            image_size=args.image_size,
            workers=args.workers,
            progress=progress,
        )
        wall = time.perf_counter() - started
        worker_hwm_kb = watcher.stop()
        self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        disk, files = _disk_usage(out)
        truth = _truth_figures(out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    results = {
        "arguments": {
            "patients": args.patients,
            "seed": args.seed,
            "workers": args.workers,
            "image_size": args.image_size,
        },
        "wall_seconds": round(wall, 1),
        "patients_per_second": round(args.patients / wall, 2),
        "peak_rss_mb": {
            "main_process": round(self_kb / 1024, 1),
            "largest_child_ru_maxrss": round(child_kb / 1024, 1),
            "largest_worker_vmhwm": round(worker_hwm_kb / 1024, 1) if worker_hwm_kb else None,
        },
        "disk": {"bytes": disk, "gib": round(disk / 2**30, 3), "files": files},
        "target": {
            "llnm_rate_capsule_lt_2_5mm_above": TARGET_CAPSULE_RATE,
            "met": truth["llnm_rate_capsule_lt_2_5mm"] > TARGET_CAPSULE_RATE,
        },
        "truth": truth,
        "consortium_json": {
            "bayes_auc": summary["bayes_auc"],
            "modality_auc": summary["modality_auc"],
            "site_sizes": {k: v["n"] for k, v in summary["sites"].items()},
            "site_prevalence": {k: v["prevalence"] for k, v in summary["sites"].items()},
            "spacing_mm": {k: v["spacing_mm"] for k, v in summary["sites"].items()},
        },
    }
    path = Path(args.results)
    write_result(path, results, made)
    t = truth
    print(
        f"[bench] {args.patients} patients in {wall:.0f} s ({results['patients_per_second']}/s), "
        f"peak RSS main {results['peak_rss_mb']['main_process']} MB, children ru_maxrss "
        f"{results['peak_rss_mb']['largest_child_ru_maxrss']} MB, worker VmHWM "
        f"{results['peak_rss_mb']['largest_worker_vmhwm']} MB, disk {results['disk']['gib']} GiB "
        f"({files} files)"
    )
    print(
        f"[bench] LLNM rate capsule < 2.5 mm {t['llnm_rate_capsule_lt_2_5mm']} "
        f"(target > {TARGET_CAPSULE_RATE}), "
        f">= 2.5 mm {t['llnm_rate_capsule_ge_2_5mm']}; by third {t['llnm_rate_by_third']}"
    )
    for part in ("all", "test"):
        a = t["auc"][part]
        print(
            f"[bench] AUC {part:>4} (n={a['n']}): bayes {a['bayes']} image {a['image']} report {a['report']} "
            f"clinical {a['clinical']}"
        )
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
