"""`llnm-server`: the command the consortium's coordinator runs.

Each sub-command lives in its own module (`fl_server/cmd_<name>.py`) exposing
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "start": "Start a real flower-superlink where the config says.",
    "run": "Launch a federated experiment on a running deployment.",
    "simulate": "Run a federated experiment in Flower's simulation engine, one virtual SuperNode per site.",
    "resume": "Continue a stopped or crashed run from its last complete round.",
    "status": "Rounds done, per-site metrics of the last round and the privacy guarantee of a run.",
    "baseline": "Pooled or local-only reference training on a folder of site folders.",
    "evaluate-predictions": "Evaluation metrics of a CSV of scores and labels, per group.",
}


def _load(module_name: str):
    """Import a sub-command module; a command whose module is not installed is left out."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that sub-command's module is imported (the others can be slow)."""
    parser = argparse.ArgumentParser(prog="llnm-server", description="llnm-fl tools for the coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = _load(f"fl_server.cmd_{name.replace('-', '_')}")
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
