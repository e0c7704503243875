"""`llnm-server resume RUN_DIR`: continue a stopped or crashed run from its last complete round.

The run continues with the configuration saved in RUN_DIR/config.yaml, to the same number of rounds;
rounds already recorded are kept, never repeated or duplicated.
"""

from __future__ import annotations

import argparse
import sys

from fl_server.config import ConfigError
from fl_server.run_dir import RunDirectory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", help="simulation only: the folder of site folders, if it moved")
    p.add_argument("--superlink", help="deployment only: HOST:PORT, if it changed")


def run(args: argparse.Namespace) -> int:
    rd = RunDirectory(args.run_dir)
    try:
        if not rd.exists():
            raise ConfigError(f"{rd.path}: not a run directory (no config.yaml)")
        exp = rd.load_config()
        info = rd.run_info()
        done = rd.last_complete_round()
        if done >= exp.federation.rounds and info.get("status") == "completed":
            print(f"{rd.path}: all {exp.federation.rounds} rounds are complete; nothing to resume")
            return 0
        if info.get("mode") == "deployment":
            from fl_server.cmd_run import launch

            return launch(rd, args.superlink or info["superlink"], info.get("root_certificates"))
        from fl_server.simulation import simulate

        simulate(exp, rd, data_root=args.data or info.get("data_root"), resume=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
