"""`llnm-server simulate --config CONFIG [--data CONSORTIUM_DIR] --out RUN_DIR`."""

from __future__ import annotations

import argparse
import sys

from fl_server.config import ConfigError
from fl_server.run_dir import NothingToResume, RunDirectory, experiment_for, start_error_exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--data", help="folder of site folders (overrides data.root)")
    p.add_argument("--out", required=True, help="run directory to create (e.g. runs/demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set federation.rounds=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="if --out already holds this run, continue it from its last complete round")


def _end_the_engine(signum: int) -> None:
    """`llnm-server stop` sends SIGTERM: end the simulation engine's processes with this one, so that no Ray
    worker trains on. The run directory's lock goes with the process, and `resume` continues the run."""
    import os

    try:
        import ray

        ray.shutdown()
    finally:
        os._exit(128 + signum)


def run(args: argparse.Namespace) -> int:
    import signal

    from shared_model.supervisor import Supervisor

    with Supervisor(on_stop=_end_the_engine, signals=(signal.SIGTERM,)):
        return _simulate(args)


def _simulate(args: argparse.Namespace) -> int:
    from fl_research.simulation import simulate

    try:
        rd = RunDirectory(args.out)
        exp, resuming = experiment_for(rd, resume=args.resume, config=args.config, overrides=args.set)
        simulate(exp, rd, data_root=args.data, resume=resuming)
    except (NothingToResume, ConfigError) as exc:
        return start_error_exit_code(exc)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
