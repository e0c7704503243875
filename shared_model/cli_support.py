"""The sub-command dispatcher behind `llnm-site` and `llnm-server`.

Each sub-command lives in its own module (`<package>.cmd_<name>`) exposing `add_arguments(parser)` and
`run(args) -> int`. Only the chosen sub-command's module is imported, so that `llnm-server status` does
not pay for importing torch and Flower.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType


def _load(module_name: str) -> ModuleType | None:
    """Import a sub-command module; a command whose module is not installed is left out."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser(prog: str, description: str, package: str, commands: dict[str, str],
                 only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that sub-command's module is imported."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in commands.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = _load(f"{package}.cmd_{name.replace('-', '_')}")
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def dispatch(prog: str, description: str, package: str, commands: dict[str, str],
             argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(prog, description, package, commands, chosen if chosen in commands else None)
    args = parser.parse_args(argv)
    return int(args._module.run(args) or 0)
