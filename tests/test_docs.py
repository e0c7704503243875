"""The generated documentation is current, and the generator refuses a configuration key without a meaning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import Field

from shared_model.config import Schema

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "make_config_reference.py"


def _load_reference():
    spec = importlib.util.spec_from_file_location("make_config_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _load_results_page():
    import sys

    spec = importlib.util.spec_from_file_location("make_results_page", ROOT / "docs" / "make_results_page.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_results_page"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


results_page = _load_results_page()


def test_the_results_page_and_the_readmes_table_are_current():
    assert results_page.render_page() == (ROOT / "docs" / "results.md").read_text(encoding="utf-8"), (
        "docs/results.md differs from what docs/make_results_page.py writes from benchmarks/results: run "
        "`make docs` and commit it")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert results_page.readme_with_table(readme) == readme, (
        "the README's results table differs from benchmarks/results: run `make docs` and commit README.md")


def test_recorded_commands_name_paths_inside_the_checkout_relative_to_it():
    """The results page shows each command as recorded, so a recorded path into one machine's checkout would make
    the page differ in every other checkout (and the test above fail there)."""
    import json
    import re

    inside = re.compile(r"/(\.venv|benchmarks|configs|docs|fl_\w+|shared_model)/")

    def commands(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "command":
                    yield from (value if isinstance(value, list) else [value])
                else:
                    yield from commands(value)
        elif isinstance(node, list):
            for item in node:
                yield from commands(item)

    bad = [(f.name, c) for f in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
           for c in commands(json.loads(f.read_text())) if isinstance(c, str)
           and any(a.startswith("/") and inside.search(a) for a in c.replace("=", " ").split())]
    assert not bad, bad


def test_a_provenance_records_paths_inside_the_checkout_relative_to_it():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _provenance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    made = _provenance.provenance([str(ROOT / "benchmarks" / "bench_x.py"), "--data", str(ROOT / "data" / "c"),
                                   f"--out={ROOT / 'benchmarks' / 'results' / 'x.json'}", "/elsewhere/y"])
    assert made["command"] == "python benchmarks/bench_x.py --data data/c --out=benchmarks/results/x.json /elsewhere/y"


def test_a_figure_names_the_run_that_measured_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An entry's own provenance wins; an entry kept from an older run that recorded none gets the file's
    earlier_provenance; a stale file or one measured on its tuning data labels the figure."""
    new = {"commit": "a" * 40, "dirty": False, "date": "2026-12-07T00:00:00+00:00", "command": "python new"}
    old = {"commit": "b" * 40, "dirty": False, "date": "2026-11-01T00:00:00+00:00", "command": "python old"}
    doc = {"provenance": new, "earlier_provenance": old, "summary": {"gap": 0.5},
           "runs": {"x": {"auc": 0.7, "provenance": new}, "y": {"auc": 0.6}},
           "stale": {"reason": "the schedule changed"}, "tuning": {"label": "measured on its tuning data"}}
    (tmp_path / "r.json").write_text(__import__("json").dumps(doc))
    monkeypatch.setattr(results_page, "RESULTS", tmp_path)
    page = results_page
    assert page.resolve(doc, ("runs", "x", "auc"), "r")[1] is new
    assert page.resolve(doc, ("runs", "y", "auc"), "r")[1] is old
    assert page.resolve(doc, ("summary", "gap"), "r")[1] is new
    fig = page.Figure("y", "r.json", (("runs", "y", "auc"),), lambda v: f"{v:.2f}")
    _, value, prov, marks = page.figure_row(fig, {})
    assert value == "0.60" and prov == old and "`bbbbbbbbbb`" in page.made_by(prov)
    assert marks == ["stale: the schedule changed", "measured on its tuning data"]
    with pytest.raises(KeyError, match="r: no 'z'"):
        page.resolve(doc, ("runs", "z", "auc"), "r")


def test_the_configuration_reference_is_current():
    written = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert reference.render() == written, (
        "docs/config.md differs from what docs/make_config_reference.py writes from the schemas: run `make docs` "
        "and commit docs/config.md")


class _Quiet(Schema):
    """A section with one key that says what it does and one that does not."""

    explained: int = Field(1, description="says what it does")
    # A comment above a key is its meaning too.
    commented: bool = False
    silent: float = 2.0


class _Root(Schema):
    """A file whose nested section has an undocumented key."""

    documented: str = Field("x", description="documented")
    section: _Quiet = Field(default_factory=_Quiet)


def test_every_configuration_key_has_a_meaning():
    fake = reference.ConfigFile("A fake file", "For this test.", _Root)
    with pytest.raises(reference.MissingMeaning) as caught:
        reference.render([fake])
    unexplained = [line.strip() for line in str(caught.value).splitlines()[1:]]
    assert len(unexplained) == 1 and unexplained[0].startswith("section.silent "), unexplained


def test_a_documented_schema_renders_its_dotted_keys():
    class Section(Schema):
        """A section."""

        rate: float = Field(0.5, gt=0.0, le=1.0, description="a rate")
        unit: str = Field("token", pattern=r"^(token|segment)$", description="a unit")

    class File(Schema):
        """A file."""

        section: Section = Field(default_factory=Section)
        names: list[str] | None = Field(None, description="some names")

    text = reference.render([reference.ConfigFile("A fake file", "For this test.", File)])
    assert "| `section.rate` | `float (0 < x <= 1)` | `0.5` | a rate |" in text
    assert "| `names` | `list[str] \\| null` | `null` | some names |" in text


def test_check_names_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# stale\n", encoding="utf-8")
    assert reference.main(["--check", "--output", str(stale)]) == 1
    assert str(stale) in capsys.readouterr().err
    assert reference.main(["--output", str(stale)]) == 0
    assert reference.main(["--check", "--output", str(stale)]) == 0
