"""A secure-aggregation round against a plain round, on a real deployment of seven sites.

    .venv/bin/python benchmarks/bench_deployment.py [--patients 210 --seed 11 --rounds 2]

Provisions a consortium with our commands (CA, TLS SuperLink with SuperNode authentication, one registered
key and approved app per site), starts a SuperLink and seven SuperNodes (`llnm-site join`) on loopback, and
runs the same experiment (the tiny preset, `configs/demo.yaml`) twice in the same session: with plain FedAvg
rounds, then with `federation.secure_aggregation: true`. Measured, per run:

* the train phase of each round (`train_seconds` in metrics.json: from sending the round to the aggregate)
  and the whole round;
* the bytes the SuperLink counted for the run, in and out (`flwr ls --format json`; queries, train and
  evaluation messages together: evaluation is the same in both runs);
* what each site sent in its train messages, from the sites' own audit logs (arrays, plus config-record
  bytes, where SecAgg+'s masked vector travels).

Writes benchmarks/results/deployment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result

from fl_research.loopback import BIN, ROOT, free_port, start, stop

sys.path.insert(0, str(ROOT))



def cli(*args: object, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{args}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout




def audit_train_payload(state: Path, site: str, flwr_run_id: int) -> dict:
    """Bytes and messages a site sent for train messages of one run, from its audit log."""
    sent = {"messages": 0, "array_bytes": 0, "config_bytes": 0}
    for line in (state / "audit" / f"{site}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("run_id") == flwr_run_id and entry["event"] == "sent" and entry["message_type"] == "train":
            sent["messages"] += 1
            sent["array_bytes"] += entry.get("array_bytes", 0)
            sent["config_bytes"] += entry.get("config_bytes", 0)
    return sent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=210)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=ROOT / "data" / "bench-deployment")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deployment.json")
    args = p.parse_args()
    made = provenance()  # the code as it starts, before anything can change the tree
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    work = args.workdir.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    session = work / f"session-{stamp}"
    session.mkdir(parents=True)
    data = work / f"consortium-{args.patients}-{args.seed}"
    if not (data / "consortium.json").is_file():
        cli(BIN / "llnm-synth", "--out", data, "--sites", 7, "--patients", args.patients, "--seed", args.seed,
            "--quiet")
    sites = sorted(p.name for p in data.glob("site-*"))
    port = free_port()
    consortium = session / "consortium.yaml"
    consortium.write_text(yaml.safe_dump({"name": "bench", "superlink": {"address": f"127.0.0.1:{port}"},
                                          "sites": sites}))
    prov = session / "prov"
    cli(BIN / "llnm-server", "provision", "--config", consortium, "--out", prov)
    cache = session / "cache"
    env_cache = {"LLNM_CACHE_DIR": str(cache)}
    os.environ.update(env_cache)
    procs = [start([BIN / "llnm-server", "start", "--provision", prov, "--host", "127.0.0.1"],
                   session / "superlink.log")]
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the SuperLink did not start; see " + str(session / "superlink.log"))
            time.sleep(0.3)
        app = json.loads(cli(BIN / "llnm-server", "app-hash", "--json"))["sha256"]
        for site in sites:
            cli(BIN / "llnm-site", "keygen", "--out", session / "keys", "--name", site)
            cli(BIN / "llnm-server", "register-site", "--provision", prov, "--name", site, "--public-key",
                session / "keys" / f"{site}.pub")
            cli(BIN / "llnm-site", "approve", app, "--state-dir", session / "state" / site)
            cli(BIN / "llnm-site", "check", data / site)
        # Sites build their preprocessing caches before joining, so that no round of either run pays for it.
        from fl_server.config import load_config
        from shared_model.sitedata.cache import build_site_tensors

        pre = load_config(ROOT / "configs" / "demo.yaml").preprocess
        for site in sites:
            build_site_tensors(data / site, pre, cache_dir=cache, progress=False)
        for site in sites:
            procs.append(start([BIN / "llnm-site", "join", "--kit", prov / "kits" / site, "--key",
                                session / "keys" / f"{site}.key", "--data", data / site, "--state-dir",
                                session / "state" / site, "--clientappio-port", free_port(), "--threads", 1,
                                "--cache-dir", cache, "--exact-evaluation"], session / f"{site}.log"))
        deadline = time.monotonic() + 300
        while (session / "superlink.log").read_text().count("Activated node_id") < len(sites):
            if time.monotonic() > deadline:
                raise SystemExit("not every SuperNode connected; see the logs in " + str(session))
            time.sleep(0.5)
        base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        runs = {}
        for mode in ("plain", "secure"):
            cfg = {**base, "name": f"bench-{mode}", "evaluation": {"explain": False}}
            cfg["federation"] = {**base["federation"], "rounds": args.rounds, "rounds_per_epoch": 1, "eval_every": 1,
                                 "min_sites": len(sites),
                                 "final_eval_split": None, "eval_bootstrap": 0,
                                 "secure_aggregation": mode == "secure"}
            config = session / f"{mode}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            out = session / f"run-{mode}"
            t0 = time.perf_counter()
            cli(BIN / "llnm-server", "run", "--config", config, "--out", out, "--provision", prov)
            wall = time.perf_counter() - t0
            info = json.loads((out / "run.json").read_text())
            metrics = json.loads((out / "metrics.json").read_text())
            traffic = json.loads(cli(BIN / "flwr", "ls", "--run-id", info["flwr_run_id"], "--format", "json",
                                     env={"FLWR_HOME": str(prov / "flwr-home")}))["runs"][0]
            per_site = {s: audit_train_payload(session / "state" / s, s, info["flwr_run_id"]) for s in sites}
            runs[mode] = {
                "run_wall_seconds": round(wall, 1),
                "round_seconds": [r["seconds"] for r in metrics["rounds"]],
                "train_seconds": [r["train_seconds"] for r in metrics["rounds"]],
                "participants": [len(r["participants"]) for r in metrics["rounds"]],
                "pooled_val_auc": [r["pooled"].get("auc") for r in metrics["rounds"]],
                "superlink_bytes": traffic["network-traffic"],
                "site_train_bytes_per_round": {
                    s: round((v["array_bytes"] + v["config_bytes"]) / args.rounds) for s, v in per_site.items()},
                "site_train_messages_per_round": {s: v["messages"] / args.rounds for s, v in per_site.items()},
                "secure_aggregation": [r.get("secure_aggregation") for r in metrics["rounds"]],
            }
            print(f"{mode}: train phase {runs[mode]['train_seconds']} s, run {wall:.0f} s, SuperLink bytes "
                  f"{traffic['network-traffic']['total-bytes']}", flush=True)
    finally:
        for proc in reversed(procs):
            stop(proc)
    plain, secure = runs["plain"], runs["secure"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    result = {
        "benchmark": "deployment",
        "settings": {"sites": len(sites), "patients": args.patients, "seed": args.seed, "rounds": args.rounds,
                     "preset": base["model"]["preset"], "transport": "TLS + SuperNode authentication, loopback"},
        "runs": runs,
        "secure_vs_plain": {
            "train_seconds_ratio": round(mean(secure["train_seconds"]) / mean(plain["train_seconds"]), 2),
            "train_seconds_last_round": [plain["train_seconds"][-1], secure["train_seconds"][-1]],
            "superlink_bytes_ratio": round(secure["superlink_bytes"]["total-bytes"]
                                           / plain["superlink_bytes"]["total-bytes"], 2),
            "site_train_bytes_ratio": round(mean(list(secure["site_train_bytes_per_round"].values()))
                                            / mean(list(plain["site_train_bytes_per_round"].values())), 2),
        },
        "note": ("The tiny preset (353,476 float32 parameters). A plain round sends each site's model as float32; a "
                 "SecAgg+ round sends a masked int64 vector of the same length plus key shares, in four train "
                 "messages per site (setup, share keys, masked vector, unmask), each a fresh ClientApp process."),
    }
    write_result(args.out, result, made)
    print(json.dumps(result["secure_vs_plain"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
