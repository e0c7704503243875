"""`llnm-server resume RUN_DIR`: continue a stopped or crashed run from its last complete round.

The run continues with the configuration saved in RUN_DIR/config.yaml, to the same number of rounds;
rounds already recorded are kept, never repeated or duplicated. A deployment run is submitted to its
SuperLink again; a simulation run is handed to `llnm-server simulate --resume` through the command table
(the simulation engine belongs to the research tools, which the coordinator does not import).
"""

from __future__ import annotations

import argparse
import sys

from fl_server.config import ConfigError
from fl_server.run_dir import NothingToResume, RunDirectory, start_error_exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", help="simulation only: the folder of site folders, if it moved")
    p.add_argument("--superlink", help="deployment only: HOST:PORT, if it changed")


def run(args: argparse.Namespace) -> int:
    rd = RunDirectory(args.run_dir)
    try:
        rd.ensure_not_running()
        rd.resume_config()
        info = rd.run_info()
    except (NothingToResume, ConfigError) as exc:
        return start_error_exit_code(exc)
    if info.get("mode") == "deployment":
        from fl_server.cmd_run import launch
        from fl_server.deployment import ControlConnection

        # The connection the run was launched with: TLS with the same CA unless it was a loopback dev run.
        conn = ControlConnection(args.superlink or info["superlink"], info.get("root_certificates"),
                                 bool(info.get("insecure", not info.get("root_certificates"))))
        return launch(rd, conn)
    return _resume_simulation(rd, args.data)


def _resume_simulation(rd: RunDirectory, data: str | None) -> int:
    from fl_server.cli import COMMANDS, main
    from shared_model.cli_support import load_command

    if load_command(COMMANDS["simulate"]) is None:
        print(f"error: {rd.path} is a simulation run; resuming it needs the research tools "
              f"({COMMANDS['simulate'].module}), which this installation lacks", file=sys.stderr)
        return 2
    argv = ["simulate", "--config", str(rd.config_path), "--out", str(rd.path), "--resume"]
    return main([*argv, "--data", data] if data else argv)
