"""Faults on a real deployment, measured: sites killed mid-run, the SuperLink and ServerApp killed mid-round, a
stalled site, a lost quorum. Writes benchmarks/results/faults.json.

    .venv/bin/python benchmarks/bench_faults.py                    # everything (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_faults.py --only sites-killed --kill 2 --rounds 4
    .venv/bin/python benchmarks/bench_faults.py --only tier        # the three scenarios of `make test-faults`

`sites-killed` runs here, on data/consortium (make demo writes it):

Real processes on loopback (a development SuperLink without TLS, so no provisioning is needed; the TLS path is
tests/test_deployment.py's): `llnm-server start`, one `llnm-site join` per site folder, `llnm-server run`.
Once round 1 is recorded, `--kill` sites (the last ones, in name order) are SIGKILLed with their SuperNodes,
with `federation.min_sites` = sites - kill. When the round after that is recorded they join again. Writes
faults.json: per round the participants and failures, whether the killed sites were recorded as failed (per
site, with Flower's reason) and used again after rejoining, rounds recorded exactly once, and the wall time.

`tier` runs tests/test_faults.py's faults tier (`pytest -m faults`: superlink-killed with DP on and off,
stalled-site, quorum-lost, each with real processes and its own assertions) with LLNM_FAULT_RESULTS set, so each
scenario writes its figures, and collects them. A scenario whose test failed is recorded with `"passed": false`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import carry_earlier, provenance, write_result

from fl_research.loopback import BIN, ROOT, app_hash, free_port, round_records, start, stop, wait_for_port


def wait_until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1.0)


TIER = ("superlink-killed", "superlink-killed-dp-off", "stalled-site", "quorum-lost")


def run_tier() -> dict[str, dict]:
    """The faults tier of tests/test_faults.py, each scenario's figures as its test recorded them."""
    out = Path(tempfile.mkdtemp(prefix="llnm-fault-results-"))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "faults", "tests/test_faults.py", "-rA"],
                          cwd=ROOT, env={**os.environ, "LLNM_FAULT_RESULTS": str(out)}, capture_output=True,
                          text=True)
    print(done.stdout[-3000:])
    results = {}
    for name in TIER:
        path = out / f"{name}.json"
        results[name] = ({"passed": True, **json.loads(path.read_text())} if path.is_file()
                         else {"passed": False, "pytest_exit_status": done.returncode})
    print(f"faults tier: {time.perf_counter() - t0:.0f} s, pytest exit status {done.returncode}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "consortium"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kill", type=int, default=2)
    ap.add_argument("--only", choices=["sites-killed", "tier"], help="run one part (default: both)")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    previous = json.loads(Path(args.result).read_text()) if Path(args.result).is_file() else {}
    scenarios = dict(previous.get("scenarios", {}))  # those not run now are kept, with their own provenance
    ok = True
    if args.only in (None, "tier"):
        scenarios.update({name: {**figures, "provenance": made} for name, figures in run_tier().items()})
        ok = all(scenarios[name]["passed"] for name in TIER)
    if args.only in (None, "sites-killed"):
        killed = sites_killed(args)
        scenarios["sites-killed"] = {**killed, "provenance": made}
        ok = ok and killed["passed"]
    result = {
        "scenarios": scenarios,
        "summary": {
            "faults_survived": sorted(k for k, v in scenarios.items() if v.get("passed")),
            "faults_failed": sorted(k for k, v in scenarios.items() if not v.get("passed")),
            "records_lost": sum(v.get("records_lost") or 0 for v in scenarios.values() if v.get("passed")),
            "bad_input_kinds": "40, docs/site-data.md (each a test)",
        },
    }
    carry_earlier(result, previous, scenarios.values())
    write_result(args.result, result, made, default=str)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.result}")
    return 0 if ok else 1


def sites_killed(args: argparse.Namespace) -> dict:
    sites = sorted(p for p in Path(args.data).iterdir() if (p / "patients.csv").is_file())
    victims = sites[-args.kill:]
    tmp = Path(tempfile.mkdtemp(prefix="llnm-faults-"))
    exp = yaml.safe_load(Path(args.config).read_text())
    exp["name"] = "bench-faults"
    exp["evaluation"] = {"explain": False}
    exp["federation"].update({"rounds": args.rounds, "rounds_per_epoch": 1, "eval_every": 1,
                              "min_sites": len(sites) - args.kill, "round_timeout_s": 300,
                              "final_eval_split": None, "eval_bootstrap": 0, "connect_timeout_s": 300})
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    bundle_hash = app_hash()
    port = free_port()
    procs: dict[str, subprocess.Popen] = {}

    def join(site: Path, attempt: int) -> None:
        state = tmp / "state" / site.name
        subprocess.run([str(BIN / "llnm-site"), "approve", bundle_hash, "--state-dir", str(state)], check=True,
                       capture_output=True)
        procs[site.name] = start([str(BIN / "llnm-site"), "join", "--superlink", f"127.0.0.1:{port}", "--insecure",
                                  "--data", str(site), "--state-dir", str(state), "--skip-check",
                                  "--clientappio-port", str(free_port()), "--exact-evaluation"],
                                 tmp / f"join-{site.name}-{attempt}.log")

    t0 = time.perf_counter()
    run = tmp / "run"
    events: list[dict] = []
    try:
        procs["superlink"] = start([str(BIN / "llnm-server"), "start", "--insecure", "--host", "127.0.0.1", "--port",
                                    str(port)], tmp / "superlink.log")
        wait_for_port(port, timeout=180)  # a fixed pause loses this race on a busy machine
        for site in sites:
            join(site, 1)
        procs["run"] = start([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(run),
                              "--superlink", f"127.0.0.1:{port}", "--insecure"], tmp / "run.log")
        wait_until(lambda: len(round_records(run)) >= 1, "round 1", 900)
        for site in victims:
            stop(procs.pop(site.name), signal.SIGKILL)
            events.append({"after_round": 1, "event": "killed", "site": site.name, "t": time.perf_counter() - t0})
        wait_until(lambda: len(round_records(run)) >= 2, "round 2 without the killed sites", 900)
        for site in victims:
            join(site, 2)
            events.append({"after_round": 2, "event": "rejoined", "site": site.name, "t": time.perf_counter() - t0})
        rc = procs["run"].wait(timeout=1800)
    finally:
        for proc in procs.values():
            stop(proc)
    seconds = time.perf_counter() - t0
    rounds = round_records(run)
    names = {s.name for s in sites}
    killed = {s.name for s in victims}
    per_round = [{"round": r["round"], "participants": r["participants"],
                  "failures": [{"site": f["site"], "phase": f["phase"], "reason": f["reason"]} for f in r["failures"]],
                  "pooled_auc": (r.get("pooled") or {}).get("auc")} for r in rounds]
    second = rounds[1] if len(rounds) > 1 else {}
    result = {
        "what": f"{args.kill} of {len(sites)} sites SIGKILLed with their SuperNodes after round 1, min_sites "
                f"{len(sites) - args.kill}; they joined again after round 2",
        "data": args.data, "sites": sorted(names), "killed": sorted(killed), "rounds_planned": args.rounds,
        "min_sites": len(sites) - args.kill, "exit_status": rc, "seconds": round(seconds, 1), "events": events,
        "rounds": per_round,
        "checks": {
            "every_round_recorded_once": [r["round"] for r in rounds] == list(range(1, args.rounds + 1)),
            "round_2_went_on_without_the_killed": set(second.get("participants", [])) == names - killed,
            "killed_recorded_as_failed_in_round_2": killed <= {f["site"] for f in second.get("failures", [])},
            "killed_used_again_after_rejoining": any(killed <= set(r["participants"]) for r in rounds[2:]),
            "records_lost": 0 if [r["round"] for r in rounds] == list(range(1, args.rounds + 1)) else None,
        },
        "logs": str(tmp),
    }
    for r in per_round:
        print(r["round"], r["participants"], [(f["site"], f["reason"][:90]) for f in r["failures"]])
    result["passed"] = all(v for k, v in result["checks"].items() if k != "records_lost") and rc == 0
    result["records_lost"] = result["checks"]["records_lost"]
    return result


if __name__ == "__main__":
    sys.exit(main())
