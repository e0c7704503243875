"""What float16 update transport costs in accuracy and saves in bytes: the same experiment with
`federation.update_transport` float32 and float16, side by side.

    .venv/bin/python benchmarks/bench_transport.py                  # configs/demo.yaml on data/consortium

Both runs are `llnm-server simulate` with the same seeds (explanations off). Compared: the pooled test AUC of the
final evaluation, the largest difference between the two final models, and the bytes of one train reply's
objects in each encoding (the last round's update, encoded as a site would). Writes
benchmarks/results/transport.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _messages import object_bytes  # noqa: E402
from _provenance import provenance, write_result  # noqa: E402


def reply_bytes(arrays: dict) -> int:
    """Bytes of the objects of a train reply carrying `arrays` (numpy)."""
    from flwr.app import Array, ArrayRecord

    return object_bytes({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}, reply=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data" / "consortium"))
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "transport.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    tmp = Path(tempfile.mkdtemp(prefix="llnm-transport-"))
    runs = {}
    for transport in ("float32", "float16"):
        out = tmp / transport
        t0 = time.perf_counter()
        done = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", args.config, "--data", args.data,
                               "--out", str(out), "--set", f"federation.update_transport={transport}",
                               "--set", "evaluation.explain=false"], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        metrics = json.loads((out / "metrics.json").read_text())
        runs[transport] = {"seconds": round(time.perf_counter() - t0, 1), "out": str(out),
                           "final_round": metrics["final"]["round"],
                           "pooled_test_auc": metrics["final"]["pooled"].get("auc"),
                           "per_site_test_auc": {s: m.get("auc") for s, m in metrics["final"]["sites"].items()},
                           "rounds": len(metrics["rounds"])}
        print(transport, json.dumps({k: v for k, v in runs[transport].items() if k != "per_site_test_auc"}))

    from shared_model.model.checkpoint import load_checkpoint
    from shared_model.protocol.update_codec import encode_update

    last = runs["float32"]["rounds"]
    a, _ = load_checkpoint(Path(runs["float32"]["out"]) / "checkpoints" / f"round-{last:04d}.safetensors")
    b, _ = load_checkpoint(Path(runs["float16"]["out"]) / "checkpoints" / f"round-{last:04d}.safetensors")
    before, _ = load_checkpoint(Path(runs["float32"]["out"]) / "checkpoints" / f"round-{last - 1:04d}.safetensors")
    local = {k: v.numpy() for k, v in a.items()}
    global_ = {k: v.numpy() for k, v in before.items()}
    result = {
        "config": args.config, "data": args.data, "runs": runs,
        "auc_difference_float16_minus_float32": (None if None in (runs["float16"]["pooled_test_auc"],
                                                                  runs["float32"]["pooled_test_auc"])
                                                 else round(runs["float16"]["pooled_test_auc"]
                                                            - runs["float32"]["pooled_test_auc"], 4)),
        "final_model_max_abs_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
        "train_reply_bytes": {"float32": reply_bytes(local), "float16": reply_bytes(encode_update(local, global_))},
    }
    write_result(args.result, result, made)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
