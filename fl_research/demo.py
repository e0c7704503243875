"""The main job behind `make demo`: a federated run of configs/demo.yaml on the synthetic consortium."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fl_research.demo")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--data", default="data/consortium")
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    args = p.parse_args(argv)
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    from fl_server.cli import main as server_main

    started = time.perf_counter()
    rc = server_main(["simulate", "--config", args.config, "--data", args.data, "--out", out])
    if rc == 0:
        from fl_server.report import write_report

        _, html_path = write_report(out)
        print(f"[llnm] demo finished in {time.perf_counter() - started:.0f} s; "
              f"run directory: {Path(out).resolve()}")
        print(f"[llnm] report (open it in a browser, it works offline): {html_path.resolve()}")
        print(f"[llnm] model card: {(Path(out) / 'model_card.md').resolve()}")
        print(f"[llnm] per-round metrics for TensorBoard: .venv/bin/tensorboard --logdir {out}")
        print(f"[llnm] inspect it with: .venv/bin/llnm-server status {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
