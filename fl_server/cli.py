"""`llnm-server`: the command the consortium's coordinator runs (sub-commands in `fl_server/cmd_<name>.py`)."""

from __future__ import annotations

import sys

from shared_model.cli_support import dispatch

COMMANDS: dict[str, str] = {
    "start": "Start a real flower-superlink where the config says.",
    "run": "Launch a federated experiment on a running deployment.",
    "simulate": "Run a federated experiment in Flower's simulation engine, one virtual SuperNode per site.",
    "resume": "Continue a stopped or crashed run from its last complete round.",
    "status": "Rounds done, per-site metrics of the last round and the privacy guarantee of a run.",
    "baseline": "Pooled or local-only reference training on a folder of site folders.",
    "evaluate-predictions": "Evaluation metrics of a CSV of scores and labels, per group.",
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("llnm-server", "llnm-fl tools for the coordinator.", "fl_server", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
