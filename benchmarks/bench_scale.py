"""Many sites in one simulation: memory of the whole process tree and time per round for N virtual sites.

    .venv/bin/python benchmarks/bench_scale.py                          # N = 7, 25, 50, 100
    .venv/bin/python benchmarks/bench_scale.py --sizes 7,25 --rounds 2

For each N: `llnm-synth --sites N` (the seven hospitals, then seeded variants with drawn sizes) with
`--patients-per-site` patients per site on average, then `llnm-server simulate` of `configs/demo.yaml` (tiny)
for `--rounds` rounds, every site training every round, evaluation after the last round only. While it runs,
the proportional set size (PSS, so that memory shared between processes is counted once) of the simulate
process and everything under it (Ray's raylet, GCS, workers and ClientApp actors) is summed from
/proc/<pid>/smaps_rollup twice a second. Round 1 includes every site building its preprocessing cache; rounds
2 and later are steady state. Writes benchmarks/results/scale.json: per N the peak memory, memory per site
over the 7-site run, wall time per round, and whether it stayed within `--memory-limit-gib`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result

from fl_research.loopback import BIN, ROOT, process_tree


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process tree until stopped; keeps the peak and the process count then."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mib, self.processes_at_peak, self.samples = 0.0, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = process_tree(self.pid)
            total = sum(pss_mib(p) for p in pids)
            self.samples += 1
            if total > self.peak_mib:
                self.peak_mib, self.processes_at_peak = total, len(pids)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    data = tmp / f"data-{n}"
    t0 = time.perf_counter()
    if not (data / "consortium.json").is_file():
        subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", str(n), "--patients",
                        str(n * args.patients_per_site), "--seed", str(args.seed), "--image-size",
                        str(args.image_size), "--quiet"], check=True)
    synth_seconds = time.perf_counter() - t0
    exp = yaml.safe_load(Path(args.config).read_text())
    exp["name"] = f"scale-{n}"
    exp["evaluation"] = {"explain": False}
    exp["data"] = {"root": str(data), "cache_dir": str(tmp / f"cache-{n}")}
    exp["federation"].update({"rounds": args.rounds, "rounds_per_epoch": 1, "min_sites": n, "eval_every": args.rounds,
                              "final_eval_split": None, "eval_bootstrap": 0, "round_timeout_s": 3600})
    config = tmp / f"scale-{n}.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp / f"run-{n}"
    log = (tmp / f"simulate-{n}.log").open("w")
    t1 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    watch = TreeMemory(proc.pid)
    watch.start()
    rc = proc.wait()
    watch.stop()
    seconds = time.perf_counter() - t1
    rounds = json.loads((out / "metrics.json").read_text())["rounds"] if (out / "metrics.json").is_file() else []
    per_round = [r["seconds"] for r in rounds]
    return {
        "sites": n, "patients": n * args.patients_per_site, "exit_status": rc, "synth_seconds": round(synth_seconds, 1),
        "simulate_seconds": round(seconds, 1), "rounds_completed": len(rounds),
        "round_seconds": per_round,
        "steady_round_seconds": round(sum(per_round[1:]) / len(per_round[1:]), 1) if len(per_round) > 1 else None,
        "aggregated_per_round": [len(r.get("aggregated", r.get("participants", []))) for r in rounds],
        "peak_memory_gib": round(watch.peak_mib / 1024, 2), "processes_at_peak": watch.processes_at_peak,
        "memory_samples": watch.samples, "log": str(tmp / f"simulate-{n}.log"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="7,25,50,100")
    ap.add_argument("--patients-per-site", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--memory-limit-gib", type=float, default=24.0)
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    tmp = Path(tempfile.mkdtemp(prefix="llnm-scale-"))
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"N = {n}: synthesising and simulating {args.rounds} rounds ...", flush=True)
        runs.append(run_size(n, args, tmp))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "log"}), flush=True)
    base = next((r for r in runs if r["sites"] == 7), None)
    for r in runs:
        r["memory_per_site_over_7_gib"] = (round((r["peak_memory_gib"] - base["peak_memory_gib"]) / (r["sites"] - 7), 4)
                                           if base and r["sites"] > 7 else None)
        r["within_limit"] = r["peak_memory_gib"] <= args.memory_limit_gib and r["exit_status"] == 0
    result = {
        # Beside "provenance": the memory the limit is judged against.
        "machine_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "settings": {k: getattr(args, k) for k in ("patients_per_site", "rounds", "image_size", "seed", "config",
                                                   "memory_limit_gib")},
        "runs": runs,
    }
    write_result(args.result, result, made)
    print(f"wrote {args.result}")
    return 0 if all(r["within_limit"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
