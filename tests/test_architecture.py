"""The layering rules of docs/architecture.md, checked on the source: who may import whom (imports inside
`TYPE_CHECKING` blocks and functions included), no import cycles, every message key defined once
(shared_model/protocol/__init__.py) and one schema per configuration concern."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_model", "fl_client", "fl_server", "fl_research")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every project module imported anywhere in the file: function bodies and `TYPE_CHECKING` blocks too (a
    type's import is a dependency like any other: a rule or a cycle it breaks is broken)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, node.lineno))
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(name, line) for name, line in out if name.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        for name, _ in _imports(path, module):
            if name in sources and name != module:
                graph[module].add(name)
    return graph


def test_the_coordinator_never_imports_site_or_research_code() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items() if module.startswith("fl_server")
                 for name, line in _imports(path, module) if name.split(".")[0] in ("fl_client", "fl_research")]
    assert not offenders, offenders


def test_shared_model_knows_no_role() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items() if module.startswith("shared_model")
                 for name, line in _imports(path, module) if name.split(".")[0] != "shared_model"]
    assert not offenders, offenders


def test_the_coordinator_never_imports_the_site_data_package() -> None:
    """The coordinator never reads patient files: nothing in fl_server imports shared_model.sitedata."""
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items() if module.startswith("fl_server")
                 for name, line in _imports(path, module) if name.startswith("shared_model.sitedata")]
    assert not offenders, offenders


def test_the_model_and_evaluation_code_read_no_site_files() -> None:
    """What both roles run of LLNM-Net, its evaluation, the protocol and the schemas imports nothing of the
    site-data package."""
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items()
                 if module.startswith(("shared_model.model", "shared_model.evaluation", "shared_model.protocol",
                                       "shared_model.config"))
                 for name, line in _imports(path, module) if name.startswith("shared_model.sitedata")]
    assert not offenders, offenders


def test_nothing_in_the_approved_app_imports_research_code() -> None:
    """The app hospitals approve (pyproject's fab-include) holds and imports no research code."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert not [p for p in include if p.startswith("fl_research")], include
    app = ("fl_client", "fl_server", "shared_model")
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items() if module.startswith(app)
                 for name, line in _imports(path, module) if name.split(".")[0] == "fl_research"]
    assert not offenders, offenders
    assert not (ROOT / "shared_model" / "synthetic").exists() and not (ROOT / "fl_client" / "importers").exists()


def test_sites_never_import_the_coordinator() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _sources().items() if module.startswith("fl_client")
                 for name, line in _imports(path, module) if name.split(".")[0] in ("fl_server", "fl_research")]
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's own __init__ re-exporting its submodules is not a cycle through the parent.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(_sources()):
        if module not in state:
            walk(module, [])
    assert not cycles, [" -> ".join(c) for c in cycles]


def _protocol_values() -> dict[str, str]:
    from shared_model import protocol

    # Keys and record names; the clipping-mode *values* the coordinator's config also spells are not keys.
    return {value: name for name, value in vars(protocol).items()
            if name.isupper() and isinstance(value, str) and "-" in value and not name.startswith("SITE_DP_CLIENT")}


# Node-config keys that a site operator sets (`llnm-site join --node-config`), not message keys, that happen
# to share a spelling with one.
NODE_CONFIG_FILES = {"fl_client/settings.py", "fl_client/cmd_join.py", "fl_client/join_plan.py"}


def test_every_message_key_is_defined_only_in_the_protocol_module() -> None:
    keys = _protocol_values()
    assert {"dp-epsilon", "hist-pos-counts", "model-config", "num-examples", "site-name"} <= set(keys)
    offenders = []
    for module, path in _sources().items():
        rel = str(path.relative_to(ROOT))
        if module == "shared_model.protocol" or rel in NODE_CONFIG_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys:
                offenders.append(f"{rel}:{node.lineno} spells {node.value!r} (use protocol.{keys[node.value]})")
    assert not offenders, offenders


def test_experiment_sections_are_the_shared_schemas() -> None:
    from fl_server.config import ExperimentConfig, PrivacySection
    from shared_model import config

    fields = ExperimentConfig.model_fields
    assert fields["preprocess"].annotation is config.PreprocessConfig
    assert fields["train"].annotation is config.TrainConfig
    assert PrivacySection.model_fields["patient"].annotation is config.PatientDPConfig
    # One default, one place: the experiment file's defaults are the schema's.
    assert ExperimentConfig().train.lr == config.TrainConfig().lr
    lr_spellings = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                    if "3e-4" in p.read_text(encoding="utf-8")]
    assert lr_spellings == ["shared_model/config/schemas.py"]


@pytest.mark.parametrize("schema", ["ModelConfig", "PreprocessConfig", "TrainConfig", "PatientDPConfig"])
def test_round_config_carries_the_schemas_and_the_site_reads_them_back(schema: str) -> None:
    from fl_server.config import parse_config
    from fl_server.strategies import round_config
    from shared_model import config, protocol
    from shared_model.model.configuration import ModelConfig

    exp = parse_config({"privacy": {"patient": {"enabled": True, "target_epsilon": 3.0}},
                        "federation": {"strategy": "fedprox", "rounds": 4}})
    record = round_config(exp, 2)
    key = {"ModelConfig": protocol.MODEL_CONFIG, "PreprocessConfig": protocol.PREPROCESS_CONFIG,
           "TrainConfig": protocol.TRAIN_CONFIG, "PatientDPConfig": protocol.PRIVACY_CONFIG}[schema]
    got = protocol.read_schema(record, key, ModelConfig if schema == "ModelConfig" else getattr(config, schema))
    want = {"ModelConfig": exp.architecture(), "PreprocessConfig": exp.preprocess,
            "TrainConfig": exp.train, "PatientDPConfig": exp.privacy.patient}[schema]
    if schema == "TrainConfig":  # the round's own learning rate (the schedule), nothing else changes
        assert got.model_copy(update={"lr": want.lr}) == want
    else:
        assert got == want
    assert record[protocol.PROXIMAL_MU] == exp.federation.proximal_mu


def test_a_bad_round_config_is_refused_naming_the_key() -> None:
    from shared_model import config, protocol

    with pytest.raises(protocol.ProtocolError, match=r"(?s)round config 'train-config'.*lr : unknown key"):
        protocol.read_schema({protocol.TRAIN_CONFIG: '{"lr ": 0.1}'}, protocol.TRAIN_CONFIG, config.TrainConfig)
    from shared_model.model.configuration import ModelConfig

    with pytest.raises(protocol.ProtocolError, match="round config: no 'model-config'"):
        protocol.read_schema({}, protocol.MODEL_CONFIG, ModelConfig)


def test_evaluation_metrics_round_trip_through_the_message_encoding() -> None:
    import math

    import numpy as np

    from shared_model import protocol
    from shared_model.evaluation.metrics import score_histogram

    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.1, 0.8, 0.6, 0.3, 0.9])
    hist = score_histogram(y, s)
    encoded = protocol.encode_eval_metrics({"auc": 1.0, "brier": None}, n=5, n_pos=3, histogram=hist)
    assert math.isnan(encoded["brier"]) and set(protocol.EVAL_METRIC_KEYS) <= set(encoded)
    site, back = protocol.decode_eval_metrics(encoded)
    assert site["auc"] == 1.0 and site["brier"] is None and (site["n"], site["n_pos"]) == (5, 3)
    assert back == {k: (list(v) if isinstance(v, list | tuple | np.ndarray) else v) for k, v in hist.items()}
    with pytest.raises(protocol.ProtocolError, match="hist-n-bins"):
        protocol.decode_eval_metrics({k: v for k, v in encoded.items() if k != protocol.HIST_N_BINS})
