"""`llnm-server baseline --config CONFIG --mode pooled|local [--data CONSORTIUM_DIR] --out RUN_DIR`."""

from __future__ import annotations

import argparse
import logging
import sys

from fl_server.config import ConfigError, load_config, parse_set_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--mode", required=True, choices=["pooled", "local"])
    p.add_argument("--data", help="folder of site folders (overrides data.root)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from fl_research.baseline import run_baseline

    # One line per epoch (loss, lr, validation AUC) on stderr, so a long run shows where it is even with
    # --no-progress; the same lines go to RUN_DIR/baseline.log.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("llnm").addHandler(handler)
    logging.getLogger("llnm").setLevel(logging.INFO)
    try:
        exp = load_config(args.config, parse_set_options(args.set))
        res = run_baseline(exp, args.mode, args.out, data_root=args.data, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    aucs = ", ".join(f"{k} {v['auc']:.3f}" if v.get("auc") is not None else f"{k} -"
                     for k, v in res["sites"].items())
    pooled = res["pooled"].get("auc")
    print(f"{args.mode} baseline, test AUC: {aucs} | pooled {pooled if pooled is None else round(pooled, 3)}")
    print(f"wrote {args.out}/metrics.json")
    return 0
