"""Write docs/config.md: every key of the experiment file and of the consortium file, read from their schemas.

    .venv/bin/python docs/make_config_reference.py           # (re)write docs/config.md (what `make docs` runs)
    .venv/bin/python docs/make_config_reference.py --check   # exit 1, naming the file, when it is stale

The script walks the pydantic models (`fl_server.config.ExperimentConfig`, `fl_server.consortium.ConsortiumConfig`
and the shared schemas they compose): one Markdown table per section, keys written as dotted paths, each with its
type (constraints from the field metadata), its default (as YAML writes it) and its meaning. A meaning is
written once, in the schema: a field's `Field(description=...)`, else its entry in the "Attributes:" section of
its class docstring, else the `#` comment lines directly above it (or a comment at the end of its line). A key
without any of these, or a section class without a docstring, makes `render()` raise `MissingMeaning` naming it,
so that a new key cannot be added without saying what it does (tests/test_docs.py).

Importable (docs/ is not a package): `render()` returns the Markdown, `main(argv)` is the command line.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "config.md"
if str(ROOT) not in sys.path:  # run as `python docs/make_config_reference.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fl_server.config import ExperimentConfig  # noqa: E402
from fl_server.consortium import ConsortiumConfig  # noqa: E402
from shared_model.model.configuration import ModelConfig  # noqa: E402

__all__ = ["FILES", "ConfigFile", "MissingMeaning", "main", "render"]

#: Defaults must never show where this machine keeps things (a path computed at run time).
MACHINE_PATHS = ("/work", "/root", "/home", "/tmp", "/Users")

INTRO = """\
# Configuration reference

This page lists every key of the two YAML files a coordinator writes, for the coordinator writing one and for a \
hospital operator reading what a coordinator's experiment asks of the sites. The **experiment file** (one per \
experiment, e.g. `configs/demo.yaml`) is what `llnm-server simulate --config FILE`, `llnm-server run --config FILE` \
and `llnm-server baseline --config FILE` read (`llnm-server start --config FILE` reads its \
`federation.superlink` section); relative paths in it are taken from the current directory. Each of those commands \
accepts `--set KEY=VALUE`, repeatable, to change one key without editing the file: the key is a dotted path from \
the tables below (`--set federation.rounds=3`), the value is read as YAML (`--set privacy.patient.enabled=true`, \
`--set 'data.sites=[site-a, site-b]'`) and replaces the file's value, and the result is checked like the file \
(with `--resume` and an existing run, the run's saved configuration is used and `--set` is ignored). The \
**consortium file** is what `llnm-server provision --config FILE --out DIR` reads to make the consortium's \
certificates and one onboarding kit per site. Every key may be left out to take its default unless it says \
*required*; a key that is not listed here is refused, as is a wrong type or a value outside its range, with an \
error naming the key. This page is generated from the schemas by `docs/make_config_reference.py`: do not edit it \
by hand, change the schema (a field's `description`, its class docstring or the comment above it) and run \
`make docs`.
"""


class MissingMeaning(ValueError):
    """Keys (or section classes) that the schemas leave unexplained."""


class ConfigFile(NamedTuple):
    """One YAML file of the reference: its heading, a sentence on what it is, and its root schema."""

    title: str
    summary: str
    schema: type[BaseModel]


FILES: tuple[ConfigFile, ...] = (
    ConfigFile("The experiment file", "One experiment: `--config FILE` of `llnm-server simulate`, `run` and "
               "`baseline`.", ExperimentConfig),
    ConfigFile("The consortium file", "Who the hospitals are and where they reach the SuperLink: "
               "`llnm-server provision --config FILE`.", ConsortiumConfig),
)


class Row(NamedTuple):
    key: str
    type: str
    default: str
    meaning: str
    presets: str = ""


class Table(NamedTuple):
    key: str  # "" for the file's top level
    schema: type[BaseModel]
    summary: str
    note: str
    rows: list[Row]
    columns: tuple[str, ...] = ("Key", "Type", "Default", "Meaning")


# ---------------------------------------------------------------------------------------------- meanings


def _clean(text: str) -> str:
    """One line of Markdown: RST ``code`` becomes `code`, Python's None the YAML file's null, runs of whitespace
    one space."""
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = re.sub(r"\bNone\b(?! of)", "null", text)
    return " ".join(text.split())


def _own_doc(cls: type) -> str | None:
    doc = vars(cls).get("__doc__")
    return inspect.cleandoc(doc) if doc else None


def class_summary(cls: type) -> str | None:
    """The first paragraph of the class's own docstring (not an inherited one)."""
    doc = _own_doc(cls)
    return _clean(doc.split("\n\n", 1)[0]) if doc else None


_ENTRY = re.compile(r"^([A-Za-z_]\w*(?:\s*[/,]\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$")


def docstring_attributes(cls: type) -> dict[str, str]:
    """Entries of the "Attributes:" section of the class's docstring; `a / b: text` and `a, b: text` name two."""
    doc = _own_doc(cls)
    if not doc:
        return {}
    entries: dict[str, list[str]] = {}
    base: int | None = None
    entry_indent: int | None = None
    current: list[str] | None = None
    for line in doc.splitlines():
        indent = len(line) - len(line.lstrip())
        if base is None:
            if line.strip() == "Attributes:":
                base = indent
            continue
        if not line.strip():
            continue
        if indent <= base:
            break  # the next section
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(line.strip())
        if indent == entry_indent and match:
            current = [match.group(2)]
            for name in re.split(r"\s*[/,]\s*", match.group(1)):
                entries[name] = current
        elif current is not None:
            current.append(line.strip())
    return {name: _clean(" ".join(parts)) for name, parts in entries.items()}


def _comment_text(comment: str) -> str:
    text = comment.lstrip("#").removeprefix(":").strip()
    return "" if set(text) <= set("-=*") else text


def source_comments(cls: type) -> dict[str, str]:
    """Per field of the class body: the `#` lines directly above it, else a comment at the end of its line(s)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.line[: tok.start[1]].strip():
            trailing.setdefault(tok.start[0], []).append(_comment_text(tok.string))
    classdef = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for node in getattr(classdef, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, _comment_text(lines[i].strip()))
            i -= 1
        text = " ".join(t for t in above if t)
        if not text:
            end = node.end_lineno or node.lineno
            text = " ".join(t for n in range(node.lineno, end + 1) for t in trailing.get(n, []) if t)
        if text:
            out[node.target.id] = _clean(text)
    return out


def field_meanings(cls: type[BaseModel]) -> dict[str, str]:
    """What each field means: its description, else its docstring entry, else its comment (base classes too)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            out.update(source_comments(klass))
            out.update(docstring_attributes(klass))
    for name, info in cls.model_fields.items():
        if info.description:
            out[name] = _clean(info.description)
    return out


# ---------------------------------------------------------------------------------------------- types


def _number(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**6 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def constraint_text(metadata: Sequence[Any], kind: str) -> str:
    """`0 < x <= 1`, `>= 1`, `1 to 200 characters`, `matching ^...$` from pydantic's field metadata."""
    low = high = None
    min_len = max_len = None
    pattern = None
    for meta in metadata:
        if isinstance(meta, FieldInfo):
            meta_text = constraint_text(meta.metadata, kind)
            if meta_text:
                return meta_text
        elif isinstance(meta, annotated_types.Gt):
            low = ("<", meta.gt)
        elif isinstance(meta, annotated_types.Ge):
            low = ("<=", meta.ge)
        elif isinstance(meta, annotated_types.Lt):
            high = ("<", meta.lt)
        elif isinstance(meta, annotated_types.Le):
            high = ("<=", meta.le)
        elif isinstance(meta, annotated_types.MinLen):
            min_len = meta.min_length
        elif isinstance(meta, annotated_types.MaxLen):
            max_len = meta.max_length
        elif getattr(meta, "pattern", None):
            pattern = meta.pattern
    parts = []
    if low and high:
        parts.append(f"{_number(low[1])} {low[0]} x {high[0]} {_number(high[1])}")
    elif low:
        parts.append(f"{'>' if low[0] == '<' else '>='} {_number(low[1])}")
    elif high:
        parts.append(f"{high[0]} {_number(high[1])}")
    unit = "characters" if kind == "str" else "items"
    if min_len is not None and max_len is not None:
        parts.append(f"{min_len} to {max_len} {unit}")
    elif min_len is not None:
        parts.append(f"at least {min_len} {unit[:-1] if min_len == 1 else unit}")
    elif max_len is not None:
        parts.append(f"at most {max_len} {unit}")
    if pattern:
        parts.append(f"matching {pattern}")
    return ", ".join(parts)


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_annotated(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def type_text(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """A readable type: `int (>= 1)`, `"token" | "segment"`, `float (> 0) | null`, `list[str]`, `[float, float]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return type_text(args[0], [*args[1:], *metadata])
    if origin in (typing.Union, types.UnionType):
        values = [a for a in args if a is not type(None)]
        text = " | ".join(type_text(a) for a in values)
        limits = constraint_text(metadata, _kind(values[0]) if len(values) == 1 else "")
        if limits:
            text = f"{text} ({limits})"
        return f"{text} | null" if len(values) < len(args) else text
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else ("null" if a is None else str(a)) for a in args)
    if origin is list:
        text = f"list[{type_text(args[0])}]"
    elif origin is tuple:
        text = f"list[{type_text(args[0])}]" if len(args) == 2 and args[1] is Ellipsis else \
            "[" + ", ".join(type_text(a) for a in args) + "]"
    elif origin is dict:
        text = f"dict[{type_text(args[0])}, {type_text(args[1])}]"
    elif tp is Any:
        text = "any"
    elif tp is type(None):
        text = "null"
    elif isinstance(tp, type):
        text = tp.__name__
    else:
        text = str(tp)
    limits = constraint_text(metadata, _kind(tp))
    return f"{text} ({limits})" if limits else text


def _kind(tp: Any) -> str:
    tp = _strip_annotated(tp)
    return "str" if tp is str else "list" if typing.get_origin(tp) in (list, tuple) else ""


# ---------------------------------------------------------------------------------------------- defaults


def _plain(value: Any) -> Any:
    """JSON/YAML-safe: models as their non-default fields, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def yaml_text(value: Any) -> str:
    """How YAML writes the value, on one line (`0.0003`, `null`, `[1.0, 99.0]`, `{}`)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 20,
                          allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def default_value(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "*required*"
    return f"`{yaml_text(default_value(info))}`"


# ---------------------------------------------------------------------------------------------- walking


def _list_item_schema(tp: Any) -> type[BaseModel] | None:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    if typing.get_origin(tp) is list:
        item = _strip_annotated(typing.get_args(tp)[0])
        return item if _is_schema(item) else None
    return None


def _where(cls: type) -> str:
    return f"`{cls.__name__}` in `{cls.__module__.replace('.', '/')}.py`"


def walk(schema: type[BaseModel], prefix: str, tables: list[Table], missing: list[str], *,
         note: str = "") -> None:
    """Append the table of `schema` (keys under `prefix`), then those of its nested sections, depth first."""
    meanings = field_meanings(schema)
    rows: list[Row] = []
    nested: list[tuple[str, type[BaseModel], str]] = []
    for name, info in schema.model_fields.items():
        key = f"{prefix}{name}"
        annotation = _strip_annotated(info.annotation)
        if _is_schema(annotation):
            nested.append((key, annotation, "This section is *required*." if info.is_required() else ""))
            continue
        meaning = meanings.get(name, "")
        if not meaning:
            missing.append(f"{key} ({schema.__name__}.{name}: no description, docstring entry or comment)")
        item = _list_item_schema(info.annotation)
        if item is not None:
            meaning += f" Each entry: the keys of `{key}[]` below."
            nested.append((f"{key}[]", item, "One entry of the list."))
        if key in EXPANSIONS:
            meaning += f" The keys it takes are listed under `{key}` below."
        rows.append(Row(key, type_text(info.annotation, info.metadata), default_text(info), meaning))
    summary = class_summary(schema)
    if not summary:
        missing.append(f"section {prefix.rstrip('.') or '(top level)'} ({schema.__name__}: no class docstring)")
    if not rows:
        subs = ", ".join(f"`{k}`" for k, _, _ in nested)
        note = f"{note} Its keys are in its sections: {subs}.".strip()
    tables.append(Table(prefix.rstrip("."), schema, summary or "", note, rows))
    for row in rows:
        if row.key in EXPANSIONS:
            EXPANSIONS[row.key](row.key, tables, missing)
    for key, sub, sub_note in nested:
        walk(sub, f"{key}.", tables, missing, note=sub_note)


def _derived_overrides() -> dict[str, str]:
    """What `ExperimentConfig.architecture()` fills into the model overrides from other sections, read from its
    source: `overrides.setdefault("image_size", self.preprocess.image_size)` gives `preprocess.image_size`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ExperimentConfig.architecture)))
    aliases: dict[str, ast.expr] = {}
    out: dict[str, str] = {}

    class Expand(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return aliases.get(node.id, node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Attribute):
            aliases[node.targets[0].id] = node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault" \
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant):
            expr = Expand().visit(node.args[1])
            out[str(node.args[0].value)] = ast.unparse(expr).replace("self.", "")
    return out


def _model_overrides(key: str, tables: list[Table], missing: list[str]) -> None:
    """The `ModelConfig` fields that `model.overrides` may set, with the presets' values."""
    meanings = field_meanings(ModelConfig)
    derived = _derived_overrides()
    rows = []
    for name, info in ModelConfig.model_fields.items():
        meaning = meanings.get(name, "")
        if not meaning:
            missing.append(f"{key}.{name} (ModelConfig.{name}: no description, docstring entry or comment)")
        # A key filled in from the preprocess section replaces the preset's value too.
        default = f"from `{derived[name]}`" if name in derived else default_text(info)
        presets = "" if name in derived else "; ".join(
            f"`{preset}`: `{yaml_text(values[name])}`" for preset, values in ModelConfig.PRESETS.items()
            if name in values)
        rows.append(Row(f"{key}.{name}", type_text(info.annotation, info.metadata), default, meaning, presets))
    note = ("Each key replaces the value of the preset that `model.preset` names. Default: the value without a "
            "preset (the paper's); *Presets*: the presets that set another value; keys whose default says *from* "
            "follow the preprocess section unless set here.")
    summary = class_summary(ModelConfig) or ""
    if not summary:
        missing.append(f"section {key} (ModelConfig: no class docstring)")
    tables.append(Table(key, ModelConfig, summary, note, rows, ("Key", "Type", "Default", "Presets", "Meaning")))


#: Keys whose value is a mapping of another schema's fields: rendered as a table of their own after their section.
EXPANSIONS: dict[str, Callable[[str, list[Table], list[str]], None]] = {"model.overrides": _model_overrides}


# ---------------------------------------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table_markdown(table: Table) -> list[str]:
    heading = f"`{table.key}`" if table.key else "Top level"
    out = [f"### {heading}", "", f"{table.summary} ({_where(table.schema)}.)"]
    if table.note:
        out[-1] += f" {table.note}"
    out.append("")
    if table.rows:
        out.append("| " + " | ".join(table.columns) + " |")
        out.append("|" + "|".join("---" for _ in table.columns) + "|")
        for row in table.rows:
            cells = {"Key": f"`{row.key}`", "Type": f"`{row.type}`", "Default": row.default,
                     "Presets": row.presets, "Meaning": row.meaning}
            out.append("| " + " | ".join(_cell(cells[c]) for c in table.columns) + " |")
        out.append("")
    return out


def collect(files: Sequence[ConfigFile] = FILES) -> list[tuple[ConfigFile, list[Table]]]:
    """Every file's tables; raises `MissingMeaning` listing every key (and section) without a meaning."""
    missing: list[str] = []
    out = []
    for config_file in files:
        tables: list[Table] = []
        walk(config_file.schema, "", tables, missing)
        out.append((config_file, tables))
    if missing:
        raise MissingMeaning("configuration keys without a meaning (give each a Field(description=...), an "
                             "\"Attributes:\" docstring entry or a # comment above it):\n  "
                             + "\n  ".join(missing))
    return out


def render(files: Sequence[ConfigFile] = FILES) -> str:
    """docs/config.md as it should be."""
    out = [INTRO.rstrip("\n"), ""]
    contents = collect(files)
    for config_file, tables in contents:
        keys = sum(len(t.rows) for t in tables)
        out += [f"- [{config_file.title}](#{_anchor(config_file.title)}): {keys} keys"]
    out.append("")
    for config_file, tables in contents:
        out += [f"## {config_file.title}", "", config_file.summary, ""]
        for table in tables:
            out += _table_markdown(table)
    text = "\n".join(out).rstrip("\n") + "\n"
    _refuse_machine_paths(contents)
    return text


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _refuse_machine_paths(contents: list[tuple[ConfigFile, list[Table]]]) -> None:
    here = [p for p in (str(ROOT), str(Path.home()), *MACHINE_PATHS) if len(p) > 1]  # never a bare "/"
    bad = [f"{row.key}: {row.default}" for _, tables in contents for t in tables for row in t.rows
           if any(p in row.default or p in row.presets for p in here)]
    if bad:
        raise ValueError("defaults that show a path of this machine (show them symbolically instead):\n  "
                         + "\n  ".join(bad))


def count_keys(files: Sequence[ConfigFile] = FILES) -> int:
    return sum(len(t.rows) for _, tables in collect(files) for t in tables)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default docs/config.md)")
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.output}: out of date; run `make docs`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
