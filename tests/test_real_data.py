"""Configurable clinical variables, modalities absent by design, and the importers of two real data sets.

The importer tests read the real files in ../shared/data (UCI DTC, DDTI) and skip, saying why, where they are
absent; nothing is ever written there.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from shared_model.config import ConfigError, PreprocessConfig
from shared_model.config.inputs import ClinicalVariable, InputsConfig
from shared_model.model.configuration import ModelConfig
from shared_model.sitedata.contract import load_site
from tests.conftest import BIN, ROOT, shared_dir

UCI = shared_dir() / "data" / "uci_dtc"
DDTI = shared_dir() / "data" / "ddti"
needs_uci = pytest.mark.skipif(not (UCI / "Thyroid_Diff.csv").is_file(),
                               reason=f"the UCI DTC data set is absent ({UCI}); see ../shared/README.md")
needs_ddti = pytest.mark.skipif(not (DDTI / "xml").is_dir(),
                                reason=f"the DDTI data set is absent ({DDTI}); see ../shared/README.md")

CLINICAL_ONLY = {
    "images": False, "reports": False, "outcome": "LLNM",
    "clinical": [
        {"name": "age", "kind": "numeric", "unit": "years", "range": [0, 120], "center": 45, "scale": 15,
         "required": True},
        {"name": "smoking", "kind": "categorical", "levels": ["No", "Yes"]},
        {"name": "adenopathy", "kind": "categorical", "levels": ["No", "Right", "Left", "Bilateral"]},
    ],
}


def _clinical_site(root: Path, rows: list[dict[str, str]], declared: dict | None = CLINICAL_ONLY) -> Path:
    root.mkdir(parents=True)
    if declared is not None:
        (root / "site.yaml").write_text(yaml.safe_dump({"name": root.name, "inputs": declared}), encoding="utf-8")
    columns = list(rows[0])
    with (root / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _rows(n: int = 6) -> list[dict[str, str]]:
    return [{"patient_id": f"P{i}", "age": str(30 + i), "smoking": ["No", "yes", ""][i % 3],
             "adenopathy": ["No", "Right", "Left", "Bilateral"][i % 4], "llnm": str(i % 2),
             "split": ["train", "train", "val", "test"][i % 4]} for i in range(n)]


# --------------------------------------------------------------------------------------------- the schema


def test_clinical_variables_parse_cells_with_clear_messages() -> None:
    age = ClinicalVariable(name="age", kind="numeric", unit="years", range=(0, 120), typical=(18, 120))
    assert age.parse("40") == (40.0, None, None)
    assert age.parse("200")[1] == "200 is outside 0-120 years"
    assert age.parse("abc")[1].startswith("'abc' is not a number")
    value, error, warning = age.parse("15")
    assert (value, error) == (15.0, None) and "under 18" in warning
    assert age.parse("") == (None, None, None)  # missing: the placeholder token
    level = ClinicalVariable(name="adenopathy", kind="categorical", levels=["No", "Right", "Left"], required=True)
    assert level.parse("right") == ("Right", None, None)  # case is ignored, the declared spelling kept
    assert level.parse("both")[1] == "'both' must be one of No, Right, Left"
    assert "required" in level.parse("")[1]
    assert level.encode("Left") == 2.0 and level.token_levels == 3
    binary = ClinicalVariable(name="smoking", kind="categorical", levels=["No", "Yes"])
    assert binary.token_levels == 0 and binary.encode("Yes") == 1.0  # one 0/1 indicator, as sex has always been
    assert age.encode(60.0) == pytest.approx((60 - 60) / 30)  # default center/scale: middle and a quarter of range


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "smoking", "kind": "categorical", "levels": [False, True]}, "YAML reads unquoted no/yes"),
    ({"name": "split", "kind": "numeric", "range": [0, 1]}, "column or token of the contract"),
    ({"name": "Age", "kind": "numeric", "range": [0, 1]}, "a-z 0-9"),
    ({"name": "x", "kind": "numeric"}, "needs its range"),
    ({"name": "x", "kind": "categorical", "levels": ["a", "A"]}, "distinct"),
    ({"name": "x", "kind": "categorical", "levels": ["a", "b"], "unit": "mm"}, "unit is for numeric"),
])
def test_bad_variable_declarations_are_refused_by_key(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClinicalVariable.from_dict(spec)


def test_inputs_need_something_and_compare_with_a_site_declaration() -> None:
    with pytest.raises(ConfigError, match="no inputs at all"):
        InputsConfig.from_dict({"images": False, "reports": False, "clinical": []})
    defaults = InputsConfig()
    assert defaults.feature_names[:2] == ("age", "sex") and len(defaults.feature_names) == 7
    site = InputsConfig.from_dict(CLINICAL_ONLY)
    problems = dict(defaults.mismatches(site))
    assert "images" in problems and "reports" in problems and "sex" in problems
    other_order = {**CLINICAL_ONLY, "clinical": [*CLINICAL_ONLY["clinical"][:2], {
        "name": "adenopathy", "kind": "categorical", "levels": ["Right", "No", "Left", "Bilateral"]}]}
    assert "same order" in dict(site.mismatches(InputsConfig.from_dict(other_order)))["adenopathy"]
    assert InputsConfig.from_dict({**CLINICAL_ONLY, "clinical": CLINICAL_ONLY["clinical"][:1]}).mismatches(site) == []


def test_a_preprocessing_fingerprint_depends_on_the_inputs() -> None:
    assert PreprocessConfig().fingerprint() != PreprocessConfig(inputs=CLINICAL_ONLY).fingerprint()


# ------------------------------------------------------------------------------------------- the contract


def test_a_clinical_only_site_needs_no_image_or_report_column(tmp_path: Path) -> None:
    rows = _rows()
    rows[1]["age"] = "300"
    rows[2]["adenopathy"] = "Both"
    site = load_site(_clinical_site(tmp_path / "s1", rows))
    errors = [p.format() for p in site.problems if p.level == "error"]
    assert errors == ["ERROR patients.csv:3 age: 300 is outside 0-120 years",
                      "ERROR patients.csv:4 adenopathy: 'Both' must be one of No, Right, Left, Bilateral"]
    assert [p.patient_id for p in site.patients] == ["P0", "P3", "P4", "P5"]
    p3 = site.patients[1]
    assert p3.clinical == {"age": 33.0, "smoking": "No", "adenopathy": "Bilateral"}
    assert site.patients[2].clinical["smoking"] == "Yes"  # written "yes"
    assert site.patients[3].clinical["smoking"] is None  # empty: missing, not invented
    assert all(not v.present for p in site.patients for v in p.views.values()) and p3.report is None


def test_unused_modality_columns_are_warned_and_missing_variables_are_errors(tmp_path: Path) -> None:
    rows = [{**r, "report": "", "trans_image": ""} for r in _rows(4)]
    for row in rows:
        del row["smoking"]
    site = load_site(_clinical_site(tmp_path / "s2", rows))
    found = {(p.level, p.field, p.message) for p in site.problems}
    assert ("warning", "report", "ignored: the inputs declare reports: false") in found
    assert ("warning", "trans_image", "ignored: the inputs declare images: false") in found
    assert ("error", "smoking", "required column is missing") in found


def test_an_experiment_needing_what_a_site_lacks_is_refused_by_site_yaml(tmp_path: Path) -> None:
    root = _clinical_site(tmp_path / "s3", _rows())
    site = load_site(root, InputsConfig())  # the paper's inputs: images, reports, age, sex
    fields = {p.field for p in site.problems if p.file == "site.yaml" and p.level == "error"}
    assert {"inputs.images", "inputs.reports", "inputs.sex"} <= fields
    with pytest.raises(ValueError, match="does not provide the experiment's inputs"):
        from shared_model.sitedata.cache import build_site_tensors

        build_site_tensors(root, PreprocessConfig(), cache_dir=tmp_path / "cache", progress=False)


def test_clinical_only_tensors_hold_no_image_and_load_no_encoder(tmp_path: Path, monkeypatch) -> None:
    from shared_model.model import text_encoder
    from shared_model.sitedata.cache import build_site_tensors

    def refuse(*_a, **_k):
        raise AssertionError("the text encoder must not be loaded without reports")

    monkeypatch.setattr(text_encoder, "load_text_encoder", refuse)
    root = _clinical_site(tmp_path / "s4", _rows())
    pre = PreprocessConfig(inputs=CLINICAL_ONLY)
    tensors = build_site_tensors(root, pre, cache_dir=tmp_path / "cache", progress=False)
    assert tuple(tensors.image.shape) == (6, 2, 3, 0, 0) and tuple(tensors.text.shape[1:]) == (0, 0)
    assert tensors.meta["clinical_features"] == ["age", "smoking", "adenopathy"]
    assert tensors.clinical[0, 0].tolist() == pytest.approx([(30 - 45) / 15, 0.0, 0.0])
    assert tensors.clinical[1, 1].tolist() == pytest.approx([(31 - 45) / 15, 1.0, 1.0])
    assert tensors.clinical_mask[2, 0].tolist() == [1.0, 0.0, 1.0]  # smoking missing for P2


# ----------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize(("images", "reports"), [(False, False), (True, False), (False, True)])
def test_absent_modalities_build_no_pathway_and_every_parameter_learns(images: bool, reports: bool) -> None:
    from opacus import GradSampleModule

    from shared_model.model.modeling import LLNMNet, llnm_loss

    inputs = InputsConfig.from_dict({**CLINICAL_ONLY, "images": images, "reports": reports})
    cfg = ModelConfig.preset("tiny", images=images, reports=reports, num_clinical=len(inputs.token_levels),
                             clinical_levels=inputs.token_levels, text_max_length=8)
    cfg.check_inputs(inputs, "test")
    model = LLNMNet(cfg)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("patch_embed" in names) == images and ("text_proj" in names) == reports
    assert ("bidirectional" in names) == images  # two streams only with images beside the clinical tokens
    torch.manual_seed(0)
    b, s = 4, (64 if images else 0)
    batch = (torch.rand(b, 2, 3, s, s), torch.full((b, 2), float(images)),
             torch.rand(b, 8, 384) if reports else torch.zeros(b, 0, 0),
             torch.ones(b, 8) if reports else torch.zeros(b, 0),
             torch.tensor([[[0.1, 1.0, 3.0]] * 2] * b) if not images else
             torch.cat([torch.tensor([[[0.1, 1.0, 3.0]] * 2] * b), torch.zeros(b, 2, 5)], -1),
             torch.ones(b, 2, len(inputs.token_levels)))
    wrapped = GradSampleModule(model)
    out = wrapped(*batch)
    loss, _ = llnm_loss(out, torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.full((b,), -1), batch[1])
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad_sample is not None and param.grad_sample.shape[0] == b, name


def test_categorical_tokens_are_one_hot_in_the_model() -> None:
    from shared_model.model.modeling import LLNMNet

    cfg = ModelConfig.preset("tiny", images=False, reports=False, num_clinical=1, clinical_levels=[4])
    model = LLNMNet(cfg).eval()
    assert model.clinical_proj[0].in_features == 4
    values = torch.tensor([[[0.0], [0.0]], [[3.0], [3.0]]])
    out = model(torch.zeros(2, 2, 3, 0, 0), torch.zeros(2, 2), torch.zeros(2, 0, 0), torch.zeros(2, 0), values,
                torch.ones(2, 2, 1))
    assert out.llnm_logits[0, 0] != out.llnm_logits[1, 0]
    assert torch.equal(out.llnm_logits[:, 0], out.llnm_logits[:, 1])  # no images: one pass stands for both views


# ------------------------------------------------------------------------------------------- the importers


def test_the_real_data_configs_declare_what_the_importers_write() -> None:
    from fl_research.importers.ddti import ddti_inputs
    from fl_research.importers.uci_dtc import uci_inputs
    from fl_server.config import load_config

    uci = load_config(ROOT / "configs" / "uci-dtc.yaml")
    assert uci.preprocess.inputs.mismatches(uci_inputs()) == []
    assert uci.preprocess.inputs.feature_names == uci_inputs().feature_names
    arch = uci.architecture()
    assert (arch.images, arch.reports, arch.clinical_levels) == (False, False, [0, 0, 0, 0, 0, 5, 5, 6])
    ddti = load_config(ROOT / "configs" / "ddti.yaml")
    assert ddti.preprocess.inputs.mismatches(ddti_inputs()) == []  # it uses the images, not age and sex
    assert ddti.architecture().num_clinical == 5  # the image measurements only


def _import(dataset: str, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "llnm-site"), "import", dataset, str(source), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@needs_uci
def test_uci_import_writes_checked_disjoint_sites_of_preoperative_variables(tmp_path: Path) -> None:
    done = _import("uci-dtc", UCI, tmp_path / "uci", "--sites", "3", "--seed", "4", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "383 records read, 383 patients written" in done.stdout
    assert "not expressible in the contract: none" in done.stdout
    assert done.stdout.count(": USABLE, 0 error(s)") == 3
    sites = sorted((tmp_path / "uci").glob("uci-dtc-*"))
    tables = {site.name: _table(site / "patients.csv") for site in sites}
    ids = [row["patient_id"] for rows in tables.values() for row in rows]
    assert len(ids) == len(set(ids)) == 383
    assert sum(row["llnm"] == "1" for rows in tables.values() for row in rows) == 93  # N1b
    columns = set(next(iter(tables.values()))[0])
    for leaked in ("Pathology", "Focality", "Risk", "T", "N", "M", "Stage", "Response", "Recurred", "pathology",
                   "t", "n", "stage", "risk", "recurred"):
        assert leaked not in columns
    assert {"age", "sex", "smoking", "hx_smoking", "hx_radiotherapy", "thyroid_function", "physical_examination",
            "adenopathy"} <= columns
    record = yaml.safe_load((sites[0] / "site.yaml").read_text())["import"]
    assert (record["dataset"], record["seed"], record["sites"], record["site_index"]) == ("uci-dtc", 4, 3, 1)
    # Seeded: the same seed gives the same sites, another seed another split.
    again = _import("uci-dtc", UCI, tmp_path / "again", "--sites", "3", "--seed", "4")
    assert again.returncode == 0
    assert _table(tmp_path / "again" / "uci-dtc-2" / "patients.csv") == tables["uci-dtc-2"]
    other = _import("uci-dtc", UCI, tmp_path / "other", "--sites", "3", "--seed", "5")
    assert other.returncode == 0
    assert _table(tmp_path / "other" / "uci-dtc-2" / "patients.csv") != tables["uci-dtc-2"]
    # Never over an existing import, never into the source.
    refused = _import("uci-dtc", UCI, tmp_path / "uci")
    assert refused.returncode == 2 and "already holds site folders" in refused.stderr
    inside = _import("uci-dtc", UCI, UCI / "sites")
    assert inside.returncode == 2 and "inside the source" in inside.stderr
    assert not (UCI / "sites").exists()


@needs_uci
@pytest.mark.slow
def test_uci_sites_train_in_a_real_dp_federation_of_the_clinical_feature_head(tmp_path: Path) -> None:
    """Real patients through Flower's simulation engine: the round config carries the clinical-only inputs, each
    site builds the clinical-only feature head (one-hot categorical scalars) and trains it with DP-SGD."""
    done = _import("uci-dtc", UCI, tmp_path / "uci", "--sites", "3")
    assert done.returncode == 0, done.stderr
    dp = ["model.preset=feature-head", "privacy.patient.enabled=true", "privacy.patient.target_epsilon=3",
          "train.optimizer=sgd", "train.lr=1.0", "train.batch_size=256", "train.lr_schedule=constant",
          "train.weight_decay=0", "train.local_epochs=1", "federation.rounds=1", "federation.eval_bootstrap=0"]
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", str(ROOT / "configs" / "uci-dtc.yaml"), "--data",
           str(tmp_path / "uci"), "--out", str(tmp_path / "run")]
    env = {**__import__("os").environ, "LLNM_PRIVACY_DIR": str(tmp_path / "privacy")}
    run = subprocess.run(cmd + [arg for item in dp for arg in ("--set", item)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for entry in ledger["rounds"]:
        assert {rec["status"] for rec in entry["sites"].values()} == {"trained"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(r["pooled"].get("auc") is not None for r in metrics["rounds"])
    assert set(metrics["final"]["sites"]) == {"uci-dtc-1", "uci-dtc-2", "uci-dtc-3"}
    # One round of DP-SGD with site-secret noise seeds: seen from 0.69 to 0.9; chance is 0.5.
    assert metrics["final"]["pooled"]["auc"] > 0.6  # adenopathy alone separates N1b well, even under DP
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["preprocess"]["inputs"]["images"] is False and len(config["preprocess"]["inputs"]["clinical"]) == 8


@pytest.fixture(scope="module")
def ddti_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """DDTI imported once for this module: (the output folder, what the command printed)."""
    out = tmp_path_factory.mktemp("ddti") / "sites"
    done = _import("ddti", DDTI, out, "--sites", "3", "--seed", "0")
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@needs_ddti
def test_ddti_import_draws_masks_marks_the_unknown_and_counts_what_it_cannot_express(ddti_sites) -> None:
    from shared_model.sitedata.check import check_site

    out, printed = ddti_sites
    assert "classes: TI-RADS 2-3 52, TI-RADS 4a-5 246, unlabelled 92" in printed
    summary = json.loads((out / "import.json").read_text())
    assert summary["records_read"] == summary["patients_written"] == 390
    assert summary["not_expressed"] == {
        "nodule outline with broken JSON in the source (view left without mask)": 8,
        "image beyond a case's second (the contract has two views)": 18,
    }
    site = out / "ddti-1"
    rows = _table(site / "patients.csv")
    assert all(row["trans_thyroid_mask"] == row["long_thyroid_mask"] == "" for row in rows)  # no thyroid outline
    row = next(r for r in rows if r["trans_nodule_mask"])
    mask = np.asarray(Image.open(site / row["trans_nodule_mask"]))
    image = Image.open(site / row["trans_image"])
    assert mask.shape == (image.height, image.width) and 0 < (mask > 0).mean() < 0.9
    report = check_site(site, progress=False)
    assert report.usable, [p.format() for p in report.errors]
    assert report.summary["inputs"]["images"] and not report.summary["inputs"]["reports"]
    assert report.summary["spacing_sources"]["none"] == report.summary["images"]["trans"]["readable"] + \
        report.summary["images"]["long"]["readable"]  # uncalibrated, reported, never guessed


@needs_ddti
def test_ddti_tensors_keep_location_and_capsule_distance_unknown(ddti_sites, tmp_path: Path) -> None:
    from fl_server.config import load_config
    from shared_model.sitedata.cache import build_site_tensors

    pre = load_config(ROOT / "configs" / "ddti.yaml").preprocess
    tensors = build_site_tensors(ddti_sites[0] / "ddti-2", pre, cache_dir=tmp_path / "cache", progress=False)
    present = tensors.view_mask > 0.5
    assert present.sum() > 100
    assert not tensors.extras["location_present"].any()  # no thyroid mask: no location map
    assert torch.isnan(tensors.extras["capsule_distance"]).all()
    names = tensors.meta["clinical_features"]
    capsule = names.index("capsule_distance")
    assert not tensors.clinical_mask[..., capsule].any()  # the model gets the placeholder, not a number
    assert tensors.image[present][:, 2].amax() <= 0.0  # the location channel stays empty


def test_check_against_an_experiment_names_what_the_site_lacks(tmp_path: Path) -> None:
    root = _clinical_site(tmp_path / "s5", _rows())
    own = subprocess.run([str(BIN / "llnm-site"), "check", str(root)], capture_output=True, text=True, timeout=120)
    assert own.returncode == 0, own.stdout
    assert "inputs (site.yaml): images no, reports no, 3 clinical variable(s)" in own.stdout
    demo = subprocess.run([str(BIN / "llnm-site"), "check", str(root), "--experiment",
                           str(ROOT / "configs" / "demo.yaml")], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 1
    assert "ERROR site.yaml inputs.images: the experiment uses ultrasound images" in demo.stdout
    assert "ERROR patients.csv:1 sex: required column is missing" in demo.stdout
