"""The sub-command dispatcher behind `llnm-site` and `llnm-server`.

A command table maps each sub-command to the module that implements it (a :class:`Command`: the dotted module
name and its help). The module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen
sub-command's module is imported, so that `llnm-server status` does not pay for importing torch and Flower,
and a command whose module is not installed is simply left out. The table names modules by string, so a
package can offer another package's commands without importing it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Command:
    """One sub-command: the dotted name of its module and its help line."""

    module: str
    help: str


def load_command(command: Command) -> ModuleType | None:
    """Import a sub-command's module; None when that module is not installed (the command is left out)."""
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (command.module == exc.name or command.module.startswith(exc.name + ".")):
            return None
        raise


def build_parser(prog: str, description: str, commands: Mapping[str, Command],
                 only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that sub-command's module is imported."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in commands.items():
        if only is not None and name != only:
            sub.add_parser(name, help=command.help)
            continue
        module = load_command(command)
        if module is None:
            continue
        p = sub.add_parser(name, help=command.help, description=command.help)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def dispatch(prog: str, description: str, commands: Mapping[str, Command], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(prog, description, commands, chosen if chosen in commands else None)
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`llnm-site check DIR | head`): not an error of ours. Point stdout at devnull so
        # that Python's final flush does not raise a second time, and exit as a piped Unix tool does.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
