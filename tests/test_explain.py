"""Explanations (issue 14): what a site computes, what it sends, and what the coordinator makes of it.

The central check is `test_an_explaining_site_sends_no_image_report_id_or_per_patient_value`: the real
ClientApp answers a final-evaluation message with `explain` on, for a real site of the shared consortium, and
every value of its reply is inspected.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import BIN, ROOT, tree_digest

from fl_server.config import ConfigError, load_config, parse_config
from shared_model import protocol
from shared_model.config.inputs import InputsConfig
from shared_model.evaluation.explanation import (
    CAPSULE_BIN_LABELS,
    MIN_AGGREGATE_PATIENTS,
    combine_site_explanations,
    feature_groups,
)

SITE = "site-a"


# ---- pure parts ---------------------------------------------------------------------------------------
def test_feature_groups_follow_the_inputs_and_map_onto_the_papers_four() -> None:
    from shared_model.evaluation.explanation import paper_group_of

    inputs = InputsConfig()
    groups = feature_groups(inputs)
    assert groups[:4] == ["morphology/texture", "margin", "location map", "report"]
    assert groups[4:6] == ["age", "sex"] and "capsule distance" in groups and len(groups) == 11
    four = {g: paper_group_of(g, inputs) for g in groups}
    assert four["location map"] == four["capsule distance"] == four["position in the lobe"] == "location"
    assert four["age"] == four["sex"] == "demographics" and four["margin"] == "morphology"
    no_images = InputsConfig.model_validate({"images": False})
    assert feature_groups(no_images) == ["report", "age", "sex"]


def test_capsule_bins_put_the_papers_threshold_in_the_outer_bin() -> None:
    from fl_client.explain.location import capsule_bin

    got = capsule_bin(np.array([0.0, 0.99, 1.0, 2.49, 2.5, 4.99, 5.0, 40.0, np.nan]))
    assert got.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, -1]
    assert CAPSULE_BIN_LABELS[2] == "2.5-5 mm"


def test_site_explanations_combine_weighted_by_patients_and_sum_counts() -> None:
    inputs = InputsConfig()
    g = len(feature_groups(inputs))
    a = {"n": 30, "shares": [1.0] + [0.0] * (g - 1),
         "capsule": {"n": [10, 0, 5, 15], "observed": [8, 0, 2, 3], "predicted": [6, 0, 1, 2],
                     "expected": [7.0, None, 2.5, 4.0]}}
    b = {"n": 10, "shares": [0.0, 1.0] + [0.0] * (g - 2),
         "capsule": {"n": [2, 4, 5, 9], "observed": [2, 2, 1, 1], "predicted": [1, 1, 1, 1],
                     "expected": [None, None, 1.5, 2.0]}}
    small = {"n": 3, "shares": [], "capsule": None}  # withheld its shares: never averaged in
    out = combine_site_explanations({"a": a, "b": b, "c": small}, inputs)
    assert out["shares"]["morphology/texture"] == pytest.approx(0.75)
    assert out["shares"]["margin"] == pytest.approx(0.25)
    assert sum(out["paper_group_shares"].values()) == pytest.approx(1.0)
    assert set(out["sites"]) == {"a", "b"} and out["paper_shares"]["location"] == pytest.approx(0.488)
    first, second = out["capsule"][0], out["capsule"][1]
    assert (first["n"], first["observed"], first["observed_rate"]) == (12, 10, pytest.approx(10 / 12))
    # The mean probability is over the patients of the sites that sent a sum (site b's 2 patients sent none).
    assert first["mean_probability"] == pytest.approx(7.0 / 10) and first["n_with_probability_sum"] == 10
    assert second["mean_probability"] is None and second["observed_rate"] == pytest.approx(0.5)


def test_explanation_and_stage_values_survive_the_message_encoding() -> None:
    from shared_model.evaluation.stage import stage_metrics

    expl = {"n": 12, "shares": [0.5, 0.5], "capsule": {"n": [1, 2, 3, 6], "observed": [1, 1, 0, 2],
                                                        "predicted": [0, 1, 1, 1],
                                                        "expected": [math.nan, math.nan, math.nan, 2.5]}}
    back = protocol.decode_explanation(protocol.encode_explanation(expl))
    assert back["n"] == 12 and back["shares"] == [0.5, 0.5] and back["capsule"]["expected"] == [None] * 3 + [2.5]
    assert "third" not in back and protocol.decode_explanation({}) is None
    stage = stage_metrics(np.array([0, 1, 2, 0, 1, 2, -1]), np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6],
         [0.3, 0.3, 0.4]]))
    assert stage["n"] == 6 and stage["auc"] == [1.0, 1.0, 1.0] and stage["auc_macro"] == 1.0
    lone = stage_metrics(np.array([0, 0, 1]), np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]]))
    assert lone["auc"][2] is None and lone["auc_macro"] == 1.0  # class 2 absent: no AUC, left out of the mean
    decoded = protocol.decode_stage_metrics(protocol.encode_stage_metrics(lone))
    assert decoded["auc"][2] is None and decoded["n"] == 3


def test_explain_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.explain: explanations need the LLNM-Net"):
        parse_config({"model": {"preset": "feature-head"}, "evaluation": {"explain": True}})
    with pytest.raises(ConfigError, match="final_eval_split is null"):
        parse_config({"evaluation": {"explain": True}, "federation": {"final_eval_split": None}})


def test_rollout_and_gradcam_on_a_tiny_model() -> None:
    """Rollout relevances are a distribution over each view's tokens; Grad-CAM++ maps are in [0, 1] and zero
    for a missing view."""
    from fl_client.explain.gradcam import gradcam_pp
    from fl_client.explain.rollout import attention_rollout
    from shared_model.model.configuration import ModelConfig
    from shared_model.model.modeling import LLNMNet
    from shared_model.sitedata.tensors import SiteTensors

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32, patch_size=8, text_max_length=6, num_clinical=3, text_dim=16)
    model = LLNMNet(cfg)
    n = 5
    view_mask = torch.ones(n, 2)
    view_mask[0, 1] = 0
    tensors = SiteTensors(site="s", patient_ids=[f"p{i}" for i in range(n)], splits=["test"] * n,
                          image=torch.rand(n, 2, 3, 32, 32), view_mask=view_mask, text=torch.randn(n, 6, 16),
                          text_mask=torch.ones(n, 6), clinical=torch.randn(n, 2, 3), clinical_mask=torch.ones(n, 2, 3),
                          llnm=torch.tensor([0.0, 1, 0, 1, 1]), stage=torch.zeros(n, dtype=torch.long))
    out = attention_rollout(model, tensors)
    assert len(out) == n and all(b.record is None for b in model.self_blocks)  # recording switched off again
    view = out[1]["views"][0]
    assert view["image"].shape == (4, 4) and view["report"].shape == (6,) and view["scalars"].shape == (3,)
    total = view["image"].sum() + view["report"].sum() + view["no_report"] + view["scalars"].sum()
    assert total == pytest.approx(1.0, abs=1e-5)
    cams = gradcam_pp(model, tensors, view=1)
    assert cams.shape == (n, 4, 4) and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert not cams[0].any() and cams[1:].any()


def test_group_totals_by_the_generators_definition_are_complete_signed_group_sums() -> None:
    """With a baseline and signed groups (the research comparison with the generator) a group's value is the
    absolute signed sum of its inputs' attributions: never above the sites' sum of absolute attributions, and
    together at least the probability change from the baseline (completeness); the baseline patient gets
    nothing."""
    from fl_client.explain.attribution import group_totals
    from shared_model.model.configuration import ModelConfig
    from shared_model.model.modeling import LLNMNet
    from shared_model.sitedata.tensors import SiteTensors

    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", image_size=32, patch_size=8, text_max_length=6, num_clinical=3, text_dim=16,
                             dropout=0.0)
    model = LLNMNet(cfg).eval()
    n = 6
    tensors = SiteTensors(site="s", patient_ids=[f"p{i}" for i in range(n)], splits=["test"] * n,
                          image=torch.rand(n, 2, 3, 32, 32), view_mask=torch.ones(n, 2), text=torch.randn(n, 6, 16),
                          text_mask=torch.ones(n, 6), clinical=torch.randn(n, 2, 3), clinical_mask=torch.ones(n, 2, 3),
                          llnm=torch.ones(n), stage=torch.zeros(n, dtype=torch.long))
    baseline = {"image": tensors.image.mean(0, keepdim=True), "text": tensors.text.mean(0, keepdim=True),
                "clinical": tensors.clinical.mean(0, keepdim=True)}
    signed = group_totals(model, tensors, steps=64, baseline=baseline, signed_groups=True)
    absolute = group_totals(model, tensors, steps=64, baseline=baseline)
    assert signed.shape == absolute.shape == (n, 3 + 1 + 3)
    assert (signed <= absolute + 1e-6).all() and (signed < absolute - 1e-6).any()
    at_base = SiteTensors(site="s", patient_ids=["b"], splits=["test"], image=baseline["image"],
                          view_mask=torch.ones(1, 2), text=baseline["text"], text_mask=torch.ones(1, 6),
                          clinical=baseline["clinical"], clinical_mask=torch.ones(1, 2, 3), llnm=torch.ones(1),
                          stage=torch.zeros(1, dtype=torch.long))
    assert np.abs(group_totals(model, at_base, steps=8, baseline=baseline, signed_groups=True)).max() < 1e-7
    # completeness: the signed group sums add up to the change, so their absolute values bound it
    with torch.no_grad():
        def prob(t: SiteTensors) -> torch.Tensor:
            out = model(t.image, t.view_mask, t.text, t.text_mask, t.clinical, t.clinical_mask)
            return LLNMNet.patient_probability(out, t.view_mask)
        change = (prob(tensors) - prob(at_base)).abs().numpy()
    assert (signed.sum(axis=1) >= change - 1e-3).all()


# ---- a real site answering a real evaluate message ------------------------------------------------------
def _values(record: object) -> list[object]:
    out: list[object] = []
    for value in dict(record).values():
        out += list(value) if isinstance(value, list) else [value]
    return out


def _evaluate(small_consortium: Path, monkeypatch: pytest.MonkeyPatch, node_config: dict, state_dir: Path,
              run: str = "explain-test") -> tuple:
    """The final evaluation of run `run` with explanations, at one site with its own privacy folder."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_client.client_app import make_client_app
    from fl_server.strategies import initial_state, round_config

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    exp = load_config(ROOT / "configs" / "demo.yaml")
    exp.name = run
    torch.manual_seed(3)
    state = initial_state(exp)
    config = round_config(exp, exp.federation.rounds, split="test", explain=True)
    msg = Message(RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(state), protocol.CONFIG_RECORD: config}),
                  dst_node_id=1, message_type="evaluate")
    msg.content[protocol.CONFIG_RECORD][protocol.EXPLAIN_STEPS] = 8
    msg.content[protocol.CONFIG_RECORD][protocol.SERVER_ROUND] = exp.federation.rounds  # set by Flower's strategy
    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(small_consortium / SITE),
                                                    "privacy-state-dir": str(state_dir), **node_config},
                  state=RecordDict(), run_config={})
    reply = make_client_app()(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply, exp, state


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "dp"])
def test_an_explaining_site_sends_no_image_report_id_or_per_patient_value(
        small_consortium: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exact: bool) -> None:
    from shared_model.model.architectures import build_model
    from shared_model.model.training import predict
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.model_inputs import load_site_inputs, make_dataset

    reply, exp, state = _evaluate(small_consortium, monkeypatch, {"exact-evaluation": exact}, tmp_path)
    content = reply.content
    # Only the metrics and the site's name/policy: no arrays (no image, no attribution map), no other record.
    assert set(content.keys()) == {protocol.METRICS_RECORD, protocol.SITE_RECORD}
    metrics, site = content[protocol.METRICS_RECORD], content[protocol.SITE_RECORD]
    assert (protocol.EVAL_DP_SIGMA in metrics) == (not exact) == (protocol.EXPLAIN_DP_SIGMA in metrics)
    explanation = protocol.decode_explanation(metrics)
    groups = feature_groups(exp.preprocess.inputs)
    assert explanation is not None
    if explanation["shares"]:
        assert set(dict(site)) - {protocol.EVAL_WITHHELD} == {protocol.SITE_NAME, protocol.SITE_POLICY,
                                                               protocol.SITE_SPLIT}
        assert len(explanation["shares"]) == len(groups) and sum(explanation["shares"]) == pytest.approx(1.0)
        assert explanation["n"] >= MIN_AGGREGATE_PATIENTS
    else:  # with DP, the noisy patient count may fall below the cell floor: then the shares are withheld
        assert not exact and explanation["n"] < MIN_AGGREGATE_PATIENTS
        assert "fewer labelled patients than the site's min-cell-count" in site[protocol.EXPLAIN_WITHHELD]
    # Every explanation list has a length fixed by the protocol (groups, bins), never by the patient count;
    # withheld shares are an empty list.
    for key, value in dict(metrics).items():
        if key.startswith("explain-") and key not in (protocol.EXPLAIN_N, protocol.EXPLAIN_DP_EPSILON,
                                                      protocol.EXPLAIN_DP_SIGMA):
            withheld = key == protocol.EXPLAIN_SHARES and not explanation["shares"]
            assert len(value) in ({0} if withheld else {len(groups), 4, 3}), key

    # What the site knows per patient, none of which may appear in the reply.
    record = load_site(small_consortium / SITE, inputs=exp.preprocess.inputs)
    tensors = load_site_inputs(small_consortium / SITE, exp.preprocess, exp.architecture()).subset("test")
    model = build_model(exp.architecture())
    model.load_state_dict(state)
    preds = predict(model, make_dataset(tensors), device="cpu")
    scores = preds["score"].astype(float)
    texts = [Path(p.report).read_text(encoding="utf-8") for p in record.patients if p.report is not None]
    strings = [str(v) for v in _values(metrics) + _values(site) if isinstance(v, str)]
    for text in strings:
        assert not any(p.patient_id in text for p in record.patients)
        assert not any(seg.strip() and seg.strip()[:30] in text for t in texts for seg in t.splitlines())
        assert str(small_consortium) not in text
    floats = np.array([float(v) for v in _values(metrics) if isinstance(v, float) and math.isfinite(v)])
    for score in scores:  # no patient's score, alone, in any float the site sent
        assert not np.isclose(floats, score, rtol=0, atol=1e-7).any(), score
    ages = [float(p.clinical["age"]) for p in record.patients if p.clinical.get("age") is not None]
    assert not np.isin(np.array(ages), floats).any()
    # A cell over fewer patients than the site's min-cell-count is suppressed whole: no count, no sum.
    for location in ("capsule", "third"):
        cells = explanation[location]
        for n, obs, pred, expected in zip(cells["n"], cells["observed"], cells["predicted"], cells["expected"],
                                          strict=True):
            if n == protocol.SUPPRESSED_CELL:
                assert obs == pred == protocol.SUPPRESSED_CELL and expected is None
            else:
                assert n >= MIN_AGGREGATE_PATIENTS and 0 <= obs <= n and 0 <= pred <= n and expected is not None
    if exact:  # exact counts are aggregates of exactly the evaluated patients
        assert sum(n for n in explanation["capsule"]["n"] if n > 0) <= metrics[protocol.EVAL_N]

    # The site explains a run's final model once: a second request in the same run is answered without it.
    again, _, _ = _evaluate(small_consortium, monkeypatch, {"exact-evaluation": exact}, tmp_path)
    assert protocol.EXPLAIN_N not in dict(again.content[protocol.METRICS_RECORD])
    assert "already explained run 'explain-test'" in again.content[protocol.SITE_RECORD][protocol.EXPLAIN_WITHHELD]

    # A site whose policy says share-explanations=false sends none of it, and says why.
    reply, _, _ = _evaluate(small_consortium, monkeypatch, {"share-explanations": False}, tmp_path, run="other")
    assert not [k for k in dict(reply.content[protocol.METRICS_RECORD]) if k.startswith("explain-")]
    assert "share-explanations=false" in reply.content[protocol.SITE_RECORD][protocol.EXPLAIN_WITHHELD]


def test_site_explain_command_writes_its_own_folder_only(small_consortium: Path, tmp_path: Path) -> None:
    """`llnm-site explain`: Grad-CAM++ figures, ranked report segments and shares, outside the site's folder."""
    from fl_server.strategies import initial_state
    from shared_model.model.checkpoint import save_checkpoint

    exp = load_config(ROOT / "configs" / "demo.yaml")
    torch.manual_seed(5)
    ckpt = save_checkpoint(tmp_path / "model.safetensors", initial_state(exp), {
        "round": 1, "model_config": exp.architecture().to_dict(), "preprocess_config": exp.preprocess.to_dict()})
    site = small_consortium / SITE
    before = tree_digest(site)
    inside = subprocess.run([str(BIN / "llnm-site"), "explain", "--model", str(ckpt), "--data", str(site),
                             "--out", str(site / "explained")], capture_output=True, text=True, timeout=300)
    assert inside.returncode == 2 and "never written into a hospital's data folder" in inside.stderr
    out = tmp_path / "explained"
    res = subprocess.run([str(BIN / "llnm-site"), "explain", "--model", str(ckpt), "--data", str(site), "--out",
                          str(out), "--patients", "3", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert tree_digest(site) == before
    result = json.loads((out / "explanations.json").read_text())
    assert len(result["patients"]) == 3 and result["aggregates"]["groups"] == feature_groups(InputsConfig())
    scores = [p["score"] for p in result["patients"]]
    assert scores == sorted(scores, reverse=True)  # highest predicted risk first
    for patient in result["patients"]:
        assert (out / patient["figure"]).stat().st_size > 5_000
        assert sum(patient["group_shares"].values()) == pytest.approx(1.0, abs=1e-3)
        assert 1 <= len(patient["report_top"]) <= 3 and all(t["text"] for t in patient["report_top"])
    page = (out / "index.html").read_text()
    assert all(p["patient_id"] in page and p["figure"] in page for p in result["patients"])
