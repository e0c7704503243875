"""Bytes per round, per site and per direction, on a real loopback deployment; and what the paper preset's
messages weigh.

    .venv/bin/python benchmarks/bench_bytes.py
    .venv/bin/python benchmarks/bench_bytes.py --sites 3 --rounds 2

A small synthetic consortium, `configs/demo.yaml` (tiny), every round trained and evaluated, every site joined
with `--keep-sent`. Measured:

* at the SuperLink: Flower's own count of the run's fleet traffic (`flwr ls --format json`: the protobuf bytes
  of every request from and response to the SuperNodes, message objects included);
* per site and message kind, upstream: the kept replies, byte for byte the objects each ClientApp pushed;
* downstream per site: the objects of one train instruction as the ServerApp builds it (the global model and
  the round config), computed with Flower's serialisation from the run's final checkpoint;
* that a train reply carries exactly the model's trainable tensors (the frozen encoders never travel);
* for `paper`: the same downstream and train-reply objects for the paper preset's initial weights (serialised,
  not trained here: a paper round on this CPU would take hours).

Writes benchmarks/results/bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _messages import object_bytes
from _provenance import provenance, write_result

from fl_research.loopback import BIN, ROOT, app_hash, free_port, start, stop, wait_for_port

sys.path.insert(0, str(ROOT))





def instruction_bytes(state: dict) -> int:
    """Bytes of the objects of one train instruction carrying `state` (what a SuperNode pulls)."""
    from flwr.app import ArrayRecord, ConfigRecord

    return object_bytes({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})}, reply=False)


def paper_sizes() -> dict:
    import torch

    from shared_model.model.configuration import ModelConfig
    from shared_model.model.modeling import LLNMNet

    torch.manual_seed(0)
    model = LLNMNet(ModelConfig.preset("paper"))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = instruction_bytes(state)
    return {"parameters": trainable, "tensors": len(state), "float32_bytes": 4 * sum(v.numel() for v in state.values()),
            "train_instruction_bytes": size,
            "note": "serialised with Flower's objects from the initial paper weights; a train reply carries the "
                    "same tensors, so the same size within a few hundred bytes"}


def _per(total: int | None, sites: int, rounds: int) -> int | None:
    return None if total is None else round(total / (sites * rounds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper preset's sizes")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "bytes.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    tmp = Path(tempfile.mkdtemp(prefix="llnm-bytes-"))
    data = tmp / "data"
    subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", str(args.sites), "--patients",
                    str(args.patients), "--seed", "2", "--image-size", "128", "--quiet"], check=True)
    sites = sorted(p for p in data.iterdir() if (p / "patients.csv").is_file())
    exp = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    exp["name"] = "bytes"
    exp["evaluation"] = {"explain": False}
    exp["federation"].update({"rounds": args.rounds, "rounds_per_epoch": 1, "min_sites": len(sites), "eval_every": 1,
                              "final_eval_split": None, "eval_bootstrap": 0, "round_timeout_s": 600})
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    bundle_hash = app_hash()
    port, run_dir = free_port(), tmp / "run"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["superlink"] = start([str(BIN / "llnm-server"), "start", "--insecure", "--host", "127.0.0.1",
                                    "--port", str(port)], tmp / "superlink.log")
        wait_for_port(port, timeout=180)  # a fixed pause loses this race on a busy machine
        for site in sites:
            state = tmp / "state" / site.name
            subprocess.run([str(BIN / "llnm-site"), "approve", bundle_hash, "--state-dir", str(state)], check=True,
                           capture_output=True)
            procs[site.name] = start([str(BIN / "llnm-site"), "join", "--superlink", f"127.0.0.1:{port}",
                                      "--insecure", "--data", str(site), "--state-dir", str(state), "--skip-check",
                                      "--keep-sent", "--cache-dir", str(tmp / "cache"), "--clientappio-port",
                                      str(free_port())], tmp / f"join-{site.name}.log")
        done = subprocess.run([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(run_dir),
                               "--superlink", f"127.0.0.1:{port}", "--insecure"], capture_output=True, text=True,
                              cwd=ROOT, timeout=3600)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        info = json.loads((run_dir / "run.json").read_text())
        listed = subprocess.run([str(BIN / "flwr"), "ls", "llnm", "--run-id", str(info["flwr_run_id"]), "--format",
                                 "json"], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "FLWR_HOME": str(run_dir / "flwr-home")})
        traffic = json.loads(listed.stdout)
    finally:
        for proc in procs.values():
            stop(proc)

    from fl_client.sent_messages import read_message
    from shared_model.model.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(run_dir / "checkpoints" / f"round-{args.rounds:04d}.safetensors")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    upstream: dict[str, dict] = {}
    trainable_only = True
    for site in sites:
        per_kind: dict[str, list[int]] = {}
        for path in sorted((tmp / "state" / site.name / "sent").rglob("*.bin")):
            msg = read_message(path)
            kind = str(msg.metadata.message_type)
            per_kind.setdefault(kind, []).append(path.stat().st_size)
            if kind == "train" and not msg.has_error():
                keys = {k for rec in msg.content.array_records.values() for k in rec}
                trainable_only = trainable_only and keys <= set(model.state_dict()) and trainable <= keys
        upstream[site.name] = {k: {"messages": len(v), "bytes_each": sorted(set(v))} for k, v in per_kind.items()}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    down = instruction_bytes(state)
    run = (traffic.get("runs") or [{}])[0].get("network-traffic", {})
    if not run:
        print(f"warning: flwr ls gave no traffic: {traffic}", file=sys.stderr)
    result = {
        "settings": {"sites": len(sites), "patients": args.patients, "rounds": args.rounds, "preset": "tiny",
                     "every_round": "train + evaluate"},
        "superlink_traffic": {"inbound_bytes": run.get("inbound-bytes"), "outbound_bytes": run.get("outbound-bytes"),
                              "source": "flwr ls --format json (Flower's count of the run's fleet traffic)",
                              "per_site_per_round_inbound": _per(run.get("inbound-bytes"), len(sites), args.rounds),
                              "per_site_per_round_outbound": _per(run.get("outbound-bytes"), len(sites),
                                                                  args.rounds)},
        "tiny": {"parameters": sum(p.numel() for p in model.parameters()),
                 "train_instruction_bytes_per_site": down,
                 "upstream_per_site": upstream,
                 "train_reply_carries_only_model_tensors": trainable_only},
        "paper": None if args.no_paper else paper_sizes(),
        "compression": {
            "this_run": exp["federation"].get("update_transport", "float32"),
            "offered": "federation.update_transport: float16 halves the bytes of every update (refused with secure "
                       "aggregation); its size and its effect on the model: benchmarks/results/transport.json",
        },
        "logs": str(tmp),
    }
    write_result(args.result, result, made)
    print(json.dumps({k: v for k, v in result.items() if k != "logs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
