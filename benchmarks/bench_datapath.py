"""The data path's throughput: DICOM decoding, site preprocessing with a cold and a warm cache, and the share
of a deployed round a site spends outside its training loop.

    .venv/bin/python benchmarks/bench_datapath.py
    .venv/bin/python benchmarks/bench_datapath.py --rounds-from /tmp/llnm-soak-XXXX   # a soak/fault run's logs

1. Decoding: every real file in ../shared/data/us_dicom through `read_image` (the middle cine frame, as
   training reads it), `--repeat` times after one untimed read; images/s and megapixels/s per file and over all.
2. Preprocessing: `build_site_tensors` of one synthetic site (`llnm-synth`, demo preprocessing) into an empty
   cache (decode, masks, location map, feature images, the frozen text encoder), then again (cache hit);
   patients/s cold, seconds warm.
3. Warm loading: one synthetic site of `--warm-patients` patients, its cache built once; then, alternately and
   `--repeat` times each, the site's table read (`load_site`) and its warm `build_site_tensors`, and a whole
   in-process train message of the site's ClientApp (a quarter pass, as the demo's rounds), with each listed
   file resolved in full (the baseline: how every file was checked before `_TableFiles`) and as shipped
   (each folder resolved once, one `lstat` per file). Medians.
4. Rounds (with `--rounds-from`, a folder holding `run/` and `state/<site>/audit/`, as bench_soak.py and the
   fault tests leave): per train message, the ClientApp's time from pulling the message to pushing the reply
   (the site's audit log) against its training loop's `train-seconds`, so the share spent outside training
   (loading the cache and model, serialising the update). The ClientApp process start before the pull
   (interpreter and imports) is not in it; `--clientapp-start` times that separately.

Writes benchmarks/results/datapath.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result  # noqa: E402


def decode(folder: Path, repeat: int) -> dict:
    from shared_model.sitedata.imaging import read_image

    files = []
    for path in sorted(folder.glob("*.dcm")):
        img = read_image(path)
        t0 = time.perf_counter()
        for _ in range(repeat):
            img = read_image(path)
        seconds = (time.perf_counter() - t0) / repeat
        files.append({"file": path.name, "transfer_syntax": img.transfer_syntax, "frames": img.frames,
                      "rows": img.rows, "columns": img.columns, "seconds_per_image": round(seconds, 4),
                      "images_per_second": round(1 / seconds, 2),
                      "megapixels_per_second": round(img.rows * img.columns / 1e6 / seconds, 2)})
    total = sum(f["seconds_per_image"] for f in files)
    return {"folder": str(folder), "repeat": repeat, "files": files,
            "images_per_second_overall": round(len(files) / total, 2) if total else None}


def preprocess(tmp: Path, patients: int, image_size: int) -> dict:
    from fl_server.config import load_config
    from shared_model.sitedata.cache import build_site_tensors

    data = tmp / "synth"
    subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", "1", "--patients", str(patients),
                    "--seed", "5", "--image-size", str(image_size), "--quiet"], check=True)
    site = data / "site-a"
    pre = load_config(ROOT / "configs" / "demo.yaml").preprocess
    t0 = time.perf_counter()
    tensors = build_site_tensors(site, pre, cache_dir=tmp / "cache", progress=False)
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    build_site_tensors(site, pre, cache_dir=tmp / "cache", progress=False)
    warm = time.perf_counter() - t1
    return {"patients": len(tensors), "views": int(tensors.view_mask.sum()), "image_size": image_size,
            "model_image_size": pre.image_size, "cold_seconds": round(cold, 2),
            "cold_patients_per_second": round(len(tensors) / cold, 2), "warm_seconds": round(warm, 3),
            "cold_over_warm": round(cold / warm, 1)}


def warm_loading(tmp: Path, patients: int, repeat: int) -> dict:
    import contextlib
    from unittest import mock

    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_client.client_app import make_client_app
    from fl_client.settings import CACHE_DIR, DATA_PATH
    from fl_server.config import load_config, parse_set_options
    from fl_server.strategies import initial_state, round_config
    from shared_model import protocol
    from shared_model.sitedata import rows as contract_rows
    from shared_model.sitedata.cache import build_site_tensors
    from shared_model.sitedata.contract import load_site

    data = tmp / "warm"
    subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", "1", "--patients", str(patients),
                    "--seed", "6", "--image-size", "128", "--quiet"], check=True)
    site, cache = data / "site-a", tmp / "warm-cache"
    exp = load_config(ROOT / "configs" / "demo.yaml", parse_set_options(["federation.rounds=4",
                                                                        "federation.rounds_per_epoch=4"]))
    pre = exp.preprocess
    build_site_tensors(site, pre, cache_dir=cache, progress=False)
    for attr in ("_task_id", "_run_id", "_node_id"):  # a Message outside a running app needs an identity
        setattr(TaskIdentity, attr, 1)
    app, state = make_client_app(), initial_state(exp)
    ctx = Context(run_id=1, node_id=1, node_config={DATA_PATH: str(site), CACHE_DIR: str(cache)},
                  state=RecordDict(), run_config={})

    def train_message() -> None:
        config = round_config(exp, 2)
        config[protocol.SERVER_ROUND] = 2
        reply = app(Message(RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(state),
                                        protocol.CONFIG_RECORD: config}), dst_node_id=1, message_type="train"), ctx)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)

    tasks = {"load_site": lambda: load_site(site, pre.inputs),
             "build_site_tensors_warm": lambda: build_site_tensors(site, pre, cache_dir=cache, progress=False),
             "train_message": train_message}
    train_message()  # the first message imports what the rest reuse
    times: dict[str, dict[str, list[float]]] = {k: {"full_resolve": [], "shipped": []} for k in tasks}
    for _ in range(repeat):
        for mode in ("full_resolve", "shipped"):
            patch = (mock.patch.object(contract_rows._TableFiles, "real_regular_file", return_value=None)
                     if mode == "full_resolve" else contextlib.nullcontext())
            with patch:
                for name, task in tasks.items():
                    t0 = time.perf_counter()
                    task()
                    times[name][mode].append(time.perf_counter() - t0)
    out: dict = {"patients": patients, "repeat": repeat}
    for name, by_mode in times.items():
        base, new = (statistics.median(by_mode[m]) for m in ("full_resolve", "shipped"))
        out[name] = {"full_resolve_seconds": round(base, 3), "shipped_seconds": round(new, 3),
                     "saved_seconds": round(base - new, 3), "speedup": round(base / new, 2)}
    return out


def rounds(folder: Path) -> dict:
    metrics = json.loads((folder / "run" / "metrics.json").read_text())["rounds"]
    train_seconds = {(r["round"], site): m.get("train-seconds") for r in metrics for site, m in r["train"].items()}
    shares, walls, trains = [], [], []
    for log in sorted((folder / "state").glob("*/audit/*.jsonl")):
        site = log.stem
        received: dict[int, dt.datetime] = {}
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("message_type") != "train" or entry.get("round") is None:
                continue
            when = dt.datetime.fromisoformat(entry["time"])
            if entry["event"] == "received":
                received[entry["round"]] = when
            elif entry["event"] == "sent" and entry["round"] in received:
                wall = (when - received.pop(entry["round"])).total_seconds()
                train = train_seconds.get((entry["round"], site))
                if train and wall > 0:
                    walls.append(wall)
                    trains.append(train)
                    shares.append(1 - train / wall)
    return {"folder": str(folder), "train_messages": len(shares),
            "median_clientapp_seconds_after_pull": round(statistics.median(walls), 2) if walls else None,
            "median_train_seconds": round(statistics.median(trains), 2) if trains else None,
            "median_share_outside_training": round(statistics.median(shares), 3) if shares else None}


def clientapp_start(repeat: int) -> dict:
    """Seconds for a fresh interpreter to import what every ClientApp process imports before it can pull."""
    code = "import flwr.supernode.runtime.run_clientapp, fl_client.app_gate, fl_client.client_app, torch"
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return {"imports": code, "median_seconds": round(statistics.median(times), 2), "repeat": repeat}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dicoms", default=str(ROOT.parent / "shared" / "data" / "us_dicom"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--warm-patients", type=int, default=400)
    ap.add_argument("--rounds-from", help="a folder with run/ and state/<site>/audit/ (bench_soak.py's)")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "datapath.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    tmp = Path(tempfile.mkdtemp(prefix="llnm-datapath-"))
    result: dict = {}
    if Path(args.dicoms).is_dir():
        result["decode"] = decode(Path(args.dicoms), args.repeat)
    else:
        result["decode"] = {"skipped": f"{args.dicoms} not found"}
    result["preprocess"] = preprocess(tmp, args.patients, args.image_size)
    result["warm_loading"] = warm_loading(tmp, args.warm_patients, args.repeat)
    result["clientapp_start"] = clientapp_start(3)
    if args.rounds_from:
        result["rounds"] = rounds(Path(args.rounds_from))
    write_result(args.result, result, made)
    print(json.dumps({k: v for k, v in result.items() if k != "decode"}, indent=2))
    if "files" in result["decode"]:
        for f in result["decode"]["files"]:
            print(f"{f['file'][:60]:60s} {f['images_per_second']:8.2f} img/s {f['megapixels_per_second']:7.2f} MP/s")
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
