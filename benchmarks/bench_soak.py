"""Soak: many short rounds on a real loopback deployment while sites are killed and restarted at random (seeded).

    .venv/bin/python benchmarks/bench_soak.py                      # 50 rounds, 4 sites (about half an hour)
    .venv/bin/python benchmarks/bench_soak.py --rounds 10 --seed 3

A small consortium (`llnm-synth --sites 4`), `configs/demo.yaml` with one local epoch per round, evaluation every
10th round, `min_sites` 2. `llnm-server start`, one `llnm-site join` per site, `llnm-server run`. After every
recorded round, with probability `--kill-p`, one running site (never the last `min_sites + 1`) is SIGKILLed with
its SuperNode; a site down for `--down-rounds` rounds joins again.

Every round the resident memory and the open file descriptors of the long-running processes are read from /proc:
the SuperLink, the ServerApp under it, `llnm-server run`, and the join and SuperNode processes of the sites that
are never killed. A leak shows as growth from the second quarter of the rounds to the last (medians; `analyse`
says why not the first) and as the slope of a straight-line fit over the second half. Also checked: every round
is recorded exactly once, and every site that rejoined was aggregated again. Writes benchmarks/results/soak.json
(`--reanalyse` recomputes the analysis from the samples it holds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result

from fl_research.loopback import (
    BIN,
    ROOT,
    app_hash,
    cmdline,
    free_port,
    process_tree,
    round_records,
    start,
    stop,
    wait_for_port,
)

# ---- /proc ------------------------------------------------------------------------------------------------




def usage(pid: int) -> dict[str, float] | None:
    """Resident memory (MiB) and open file descriptors of one process."""
    try:
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None
    return {"rss_mib": round(rss_kb / 1024, 1), "fds": fds}


def find(root: int, marker: str) -> int | None:
    return next((p for p in process_tree(root) if marker in cmdline(p)), None)


def slope(values: list[float]) -> float:
    """Least-squares slope per round."""
    n = len(values)
    if n < 2:
        return 0.0
    xs = range(n)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    return sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / sum((x - mx) ** 2 for x in xs)


#: The leak rule, fixed before the run it judges and recorded in its result. A watched process leaks when, from the
#: second quarter of the rounds to the last (medians), its open files grow by more than FD_SLACK or its resident
#: memory by more than RSS_RATIO times plus RSS_SLACK_MIB. The first quarter is left out (see `analyse`).
FD_SLACK = 4
RSS_RATIO = 1.05
RSS_SLACK_MIB = 10
LEAK_RULE = (f"leak: last-quarter median open files > second-quarter median + {FD_SLACK}, or last-quarter median "
             f"RSS > {RSS_RATIO} x second-quarter median + {RSS_SLACK_MIB} MiB (per watched process); the first "
             "quarter of the rounds is left out")


def analyse(samples: list[dict]) -> tuple[dict, dict]:
    """Per watched process: memory and open files in the second quarter of the rounds against the last quarter
    (medians), the slope over the second half, and the processes whose figures grew (a leak).

    The first quarter is left out of the comparison: the first evaluated round imports the metric libraries
    (scikit-learn, SciPy) into the ServerApp once, a step of about 100 MiB, not a leak."""
    growth: dict[str, dict] = {}
    for key in samples[0]["usage"] if samples else []:
        series = [s["usage"][key] for s in samples if s["usage"].get(key)]
        q = len(series) // 4
        if q < 2:
            continue
        early, late = series[q:2 * q], series[-q:]
        growth[key] = {
            "rss_mib_first_round": series[0]["rss_mib"],
            "rss_mib_second_quarter": statistics.median(u["rss_mib"] for u in early),
            "rss_mib_last_quarter": statistics.median(u["rss_mib"] for u in late),
            "rss_mib_per_round_second_half": round(slope([u["rss_mib"] for u in series[len(series) // 2:]]), 3),
            "fds_second_quarter": statistics.median(u["fds"] for u in early),
            "fds_last_quarter": statistics.median(u["fds"] for u in late),
            "fds_max": max(u["fds"] for u in series),
            "samples": len(series),
        }
    leaks = {k: g for k, g in growth.items()
             if g["fds_last_quarter"] > g["fds_second_quarter"] + FD_SLACK
             or g["rss_mib_last_quarter"] > RSS_RATIO * g["rss_mib_second_quarter"] + RSS_SLACK_MIB}
    return growth, leaks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-p", type=float, default=0.3)
    ap.add_argument("--down-rounds", type=int, default=2)
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    ap.add_argument("--reanalyse", action="store_true",
                    help="recompute growth and leaks from the samples already in --result (no new run)")
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    if args.reanalyse:
        # The samples are the stored run's, so is its "provenance"; the code that recomputed the analysis is
        # recorded beside it.
        result = json.loads(Path(args.result).read_text())
        result["growth"], result["leaks"] = analyse(result["samples"])
        result["checks"]["no_leak"] = not result["leaks"]
        # A rule other than the one the run was judged by is recorded as such: a reanalysis never passes for it.
        if result.get("leak_rule") != LEAK_RULE:
            result["reanalysed_with_another_rule"] = {"run_rule": result.get("leak_rule"), "applied_rule": LEAK_RULE}
        result["reanalysed"] = made
        write_result(args.result, result, None)
        report(result)
        return 0 if all(result["checks"].values()) and result["exit_status"] == 0 else 1
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="llnm-soak-"))
    data = tmp / "data"
    subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", str(args.sites), "--patients",
                    str(args.patients), "--seed", str(args.seed), "--quiet"], check=True)
    sites = sorted(p for p in data.iterdir() if (p / "patients.csv").is_file())
    exp = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    exp["name"] = "soak"
    exp["evaluation"] = {"explain": False}
    exp["train"]["local_epochs"] = 1
    min_sites = 2
    exp["federation"].update({"rounds": args.rounds, "rounds_per_epoch": 1, "min_sites": min_sites,
                              "round_timeout_s": 180,
                              "eval_every": 10, "final_eval_split": None, "eval_bootstrap": 0,
                              "connect_timeout_s": 300})
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    bundle_hash = app_hash()
    port = free_port()
    procs: dict[str, subprocess.Popen] = {}
    attempts: dict[str, int] = {}
    # The first two sites are never killed: their processes live the whole run and are watched for leaks.
    steady = [s.name for s in sites[:2]]

    def join(site: Path) -> None:
        state = tmp / "state" / site.name
        subprocess.run([str(BIN / "llnm-site"), "approve", bundle_hash, "--state-dir", str(state)], check=True,
                       capture_output=True)
        attempts[site.name] = attempts.get(site.name, 0) + 1
        procs[site.name] = start([str(BIN / "llnm-site"), "join", "--superlink", f"127.0.0.1:{port}", "--insecure",
                                  "--data", str(site), "--state-dir", str(state), "--skip-check", "--threads", "1",
                                  "--cache-dir", str(tmp / "cache"), "--clientappio-port", str(free_port()),
                                  "--exact-evaluation"],
                                 tmp / f"join-{site.name}-{attempts[site.name]}.log")

    run_dir = tmp / "run"
    samples: list[dict] = []
    events: list[dict] = []
    down: dict[str, int] = {}
    t0 = time.perf_counter()
    rc = None
    try:
        procs["superlink"] = start([str(BIN / "llnm-server"), "start", "--insecure", "--host", "127.0.0.1",
                                    "--port", str(port)], tmp / "superlink.log")
        # A fixed pause lost this race on a busy machine: `run` then found nothing listening and stopped.
        wait_for_port(port, timeout=180)
        for site in sites:
            join(site)
        procs["run"] = start([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(run_dir),
                              "--superlink", f"127.0.0.1:{port}", "--insecure"], tmp / "run.log")
        seen = 0
        while procs["run"].poll() is None:
            done = [r["round"] for r in round_records(run_dir)]
            if len(done) == seen:
                time.sleep(1.0)
                continue
            seen = len(done)
            watched = {"superlink": find(procs["superlink"].pid, "flower-superlink"),
                       "serverapp": find(procs["superlink"].pid, "flwr-serverapp"),
                       "llnm-server run": procs["run"].pid}
            for name in steady:
                watched[f"{name} join"] = procs[name].pid
                watched[f"{name} supernode"] = find(procs[name].pid, "flower-supernode")
            samples.append({"round": seen, "t": round(time.perf_counter() - t0, 1),
                            "usage": {k: usage(p) if p else None for k, p in watched.items()}})
            for name, since in list(down.items()):
                if seen - since >= args.down_rounds:
                    join(next(s for s in sites if s.name == name))
                    events.append({"after_round": seen, "event": "rejoined", "site": name})
                    del down[name]
            alive = [s.name for s in sites if s.name not in down and s.name not in steady]
            if alive and len(sites) - len(down) > min_sites + 1 and rng.random() < args.kill_p:
                victim = rng.choice(alive)
                stop(procs.pop(victim), signal.SIGKILL)
                down[victim] = seen
                events.append({"after_round": seen, "event": "killed", "site": victim})
            print(f"round {seen}/{args.rounds} at {time.perf_counter() - t0:.0f} s; down: {sorted(down)}",
                  flush=True)
        rc = procs["run"].wait()
    finally:
        for proc in procs.values():
            stop(proc)
    metrics = round_records(run_dir)
    rounds = [r["round"] for r in metrics]
    growth, leaks = analyse(samples)
    result = {
        "rounds_planned": args.rounds, "sites": [s.name for s in sites], "patients": args.patients,
        "seed": args.seed, "kill_p": args.kill_p, "down_rounds": args.down_rounds, "never_killed": steady,
        "exit_status": rc, "seconds": round(time.perf_counter() - t0, 1),
        "kills": sum(e["event"] == "killed" for e in events), "rejoins": sum(e["event"] == "rejoined" for e in events),
        "events": events,
        "rounds_recorded": rounds,
        "checks": {
            "every_round_recorded_once": rounds == list(range(1, args.rounds + 1)),
            "no_leak": not leaks,
            "killed_sites_used_again": all(
                any(e["site"] in m.get("aggregated", {}) for m in metrics if m["round"] > e["after_round"] + 1)
                for e in events if e["event"] == "rejoined"),
        },
        "leak_rule": LEAK_RULE, "growth": growth, "leaks": leaks,
        "participants_per_round": [len(m.get("aggregated", m.get("participants", []))) for m in metrics],
        "samples": samples,
        "logs": str(tmp),
    }
    write_result(args.result, result, made)
    report(result)
    print(f"wrote {args.result}")
    return 0 if all(result["checks"].values()) and rc == 0 else 1


def report(result: dict) -> None:
    print(json.dumps({k: result[k] for k in ("checks", "seconds", "exit_status", "kills", "rejoins")}, indent=2))
    for key, g in result["growth"].items():
        print(f"{key:22s} rss {g['rss_mib_first_round']:7.1f} (round 1), {g['rss_mib_second_quarter']:7.1f} -> "
              f"{g['rss_mib_last_quarter']:7.1f} MiB ({g['rss_mib_per_round_second_half']:+.3f}/round)  "
              f"fds {g['fds_second_quarter']} -> {g['fds_last_quarter']} (max {g['fds_max']})")


if __name__ == "__main__":
    sys.exit(main())
