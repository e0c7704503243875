"""`llnm-site`: the command a hospital's site operator runs.

Each sub-command lives in its own module (`fl_client/cmd_<name>.py`) exposing
`add_arguments(parser)` and `run(args) -> int`, so that importing the CLI stays cheap
(torch is only imported by the commands that train or evaluate).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "check": "Validate a site folder against the data contract (never modifies it).",
    "inspect": "Print what an ultrasound image file holds (frames, photometric, calibration) as JSON.",
    "join": "Join a federation: start a real flower-supernode for this site.",
    "evaluate": "Evaluate a global model checkpoint on this site's own patients.",
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
    parser = argparse.ArgumentParser(prog="llnm-site", description="llnm-fl tools for a hospital site.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = _load(f"fl_client.cmd_{name}")
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
