"""Federated segmentation (`task: segment`): the reply's sums and their DP bound, the experiment's rules, the site's
side in a real ClientApp process, a federated run where one site has no drawn masks, and predicted masks feeding
LLNM-Net's preprocessing without a byte written into the site folder."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import BIN, ROOT, tree_digest
from site_process import deliver

from fl_server.config import ConfigError, load_config, parse_config
from shared_model import protocol
from shared_model.protocol import segmentation_metrics as seg

SITES_WITH_MASKS = "site-a,site-b"  # site-c draws none
TINY_SEGMENTER = {"image_size": 32, "features": [4, 4, 8, 8, 16, 4]}


def _score(dice: float, hd: float | None, capsule: float | None) -> dict:
    out = {s: {"dice": dice, "iou": dice / (2 - dice), "hd95_mm": hd} for s in ("thyroid", "nodule")}
    if capsule is not None:
        out["capsule_error_mm"] = capsule
    return out


def test_segmentation_replies_pool_to_the_mean_over_every_view() -> None:
    rng = np.random.default_rng(0)
    sites = [[_score(float(d), float(h), float(c)) for d, h, c in zip(rng.uniform(0, 1, n), rng.uniform(0, 30, n),
                                                                       rng.normal(0, 2, n), strict=True)]
             for n in (5, 9)]
    decoded = [seg.decode(seg.encode(views)) for views in sites]
    pooled = seg.pool([sums for _, sums in decoded], noisy=False)
    every = [v for views in sites for v in views]
    assert pooled["thyroid"]["n"] == 14 and pooled["capsule_error_mm"]["n"] == 14
    assert pooled["nodule"]["dice"] == pytest.approx(np.mean([v["nodule"]["dice"] for v in every]))
    hd = np.minimum([v["thyroid"]["hd95_mm"] for v in every], seg.HD95_CAP_MM)
    assert pooled["thyroid"]["hd95_mm"] == pytest.approx(hd.mean())
    errors = np.clip([v["capsule_error_mm"] for v in every], -seg.CAPSULE_CAP_MM, seg.CAPSULE_CAP_MM)
    assert pooled["capsule_error_mm"]["mean_abs"] == pytest.approx(np.abs(errors).mean())
    site, _ = decoded[0]
    assert site["nodule"]["dice_median"] == pytest.approx(np.median([v["nodule"]["dice"] for v in sites[0]]))
    assert site["dice"] == pytest.approx((site["thyroid"]["dice"] + site["nodule"]["dice"]) / 2)
    empty, _ = seg.decode(seg.encode([]))
    assert empty["n"] == 0 and empty["dice"] is None and math.isnan(seg.encode([])["seg-nodule-dice-median"])
    with pytest.raises(protocol.ProtocolError, match="seg-capsule-n"):
        seg.decode({k: v for k, v in seg.encode([]).items() if k != "seg-capsule-n"})


@pytest.mark.parametrize("dice,hd,capsule", [(1.0, 1e6, -1e3), (1.0, 0.0, 1e3), (0.0, None, None), (1.0, 19.9, 0.5)])
def test_one_patient_moves_a_segmentation_reply_by_at_most_its_sensitivity(dice: float, hd: float | None,
                                                                           capsule: float | None) -> None:
    from fl_client.privacy.evaluation import SEGMENTATION_SENSITIVITY

    view = seg.view_vector(_score(dice, hd, capsule))
    assert np.all(np.abs(view) <= 1.0)
    assert np.linalg.norm(2 * view) <= SEGMENTATION_SENSITIVITY + 1e-12  # a patient's two views


@pytest.mark.parametrize("patch,expected", [
    ({"privacy": {"patient": {"enabled": True, "target_epsilon": 3.0}}}, "privacy.patient.enabled: patient-level"),
    ({"evaluation": {"explain": True}}, "evaluation.explain: explanations are LLNM-Net's"),
    ({"segmenter": {"preset": "unet-small", "overrides": {"image_size": 100}}}, "(?s)segmenter: .*multiple of 16"),
])
def test_a_segmentation_experiment_refuses_what_it_cannot_do(patch: dict, expected: str) -> None:
    data = yaml.safe_load((ROOT / "configs" / "segment.yaml").read_text())
    for key, value in patch.items():
        data[key] = {**(data.get(key) or {}), **value}
    with pytest.raises(ConfigError, match=expected):
        parse_config(data, source="segment.yaml")


def test_the_shipped_segmentation_config_is_valid() -> None:
    exp = load_config(ROOT / "configs" / "segment.yaml")
    assert exp.task == "segment" and exp.segmenter_architecture().image_size == 128


@pytest.fixture(scope="module")
def partial_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites, 45 patients; half of site-a's and site-b's patients have drawn masks, site-c has none."""
    out = tmp_path_factory.mktemp("partial") / "c"
    done = subprocess.run([str(BIN / "llnm-synth"), "--out", str(out), "--sites", "3", "--patients", "45", "--seed",
                           "5", "--image-size", "128", "--drawn-masks", "0.5", "--drawn-masks-sites",
                           SITES_WITH_MASKS, "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def _experiment(tmp: Path, data: Path, **federation: object) -> Path:
    exp = yaml.safe_load((ROOT / "configs" / "segment.yaml").read_text())
    exp["data"] = {"root": str(data)}
    exp["segmenter"]["overrides"] = TINY_SEGMENTER
    exp["train"]["batch_size"] = 8
    exp["federation"].update({"rounds": 2, "eval_every": 1, "min_sites": 3, **federation})
    path = tmp / "segment.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_the_site_side_of_a_segmentation_round(partial_consortium: Path, tmp_path: Path) -> None:
    """In a real ClientApp process: a site without drawn masks trains nothing and returns the model unchanged; a
    crafted round asking for DP-SGD of the segmenter is refused (never trained without the guarantee asked for);
    a site's default evaluate reply is a DP release of noisy sums, charged to its evaluation budget."""
    from fl_server.strategies import initial_state, round_config

    exp = load_config(_experiment(tmp_path, partial_consortium))
    state = initial_state(exp)
    train = {**round_config(exp, 1, run_id="seg-test"), protocol.SERVER_ROUND: 1}
    dp_train = {**train, protocol.PRIVACY_CONFIG: json.dumps({"enabled": True, "target_epsilon": 3.0})}
    evaluate = {**round_config(exp, 1, split="val", run_id="seg-test"), protocol.SERVER_ROUND: 1}

    def node(site: str, **policy: object) -> dict:
        return {"data-path": str(partial_consortium / site), "privacy-state-dir": str(tmp_path / "state" / site),
                "cache-dir": str(tmp_path / "cache"), "threads": 1, **policy}

    run = deliver(tmp_path / "work", node("site-c"), [
        {"type": "train", "config": train, "arrays": state},
        {"type": "train", "config": dp_train, "arrays": state, "node_config": node("site-a")},
        {"type": "evaluate", "config": evaluate, "arrays": state, "node_config": node("site-a")},
        {"type": "evaluate", "config": evaluate, "arrays": state,
         "node_config": node("site-b", **{"exact-evaluation": True})},
    ])
    idle, refused, noisy, exact = run.replies
    assert idle.error is None and idle.metrics[protocol.NUM_EXAMPLES] == 0
    assert all(np.array_equal(idle.arrays[k].numpy(), v.numpy()) for k, v in state.items())
    assert refused.error and protocol.POLICY_REFUSAL_MARKER in refused.error and "segmenter" in refused.error
    assert noisy.error is None and noisy.metrics[seg.DP_SIGMA] > 0
    assert math.isnan(noisy.metrics["seg-nodule-dice-median"])
    assert noisy.site[protocol.EVAL_WITHHELD].startswith("differentially private")
    assert exact.error is None and seg.DP_SIGMA not in exact.metrics and exact.metrics[seg.VIEWS] > 0
    record = json.loads(next((tmp_path / "state" / "site-a").rglob("*.json")).read_text())
    assert [e["kind"] for e in record["evaluations"]] == ["segmentation"]


@pytest.mark.slow
def test_a_federated_segmentation_run_then_predicted_masks_feed_llnm_net(partial_consortium: Path,
                                                                          tmp_path: Path) -> None:
    """Two rounds in Flower's simulation (site-c has no drawn mask: it replies, counts for the quorum and is not
    averaged in); per-site Dice in metrics.json and the report; then `llnm-site segment` with the run directory
    writes site-c's masks outside its folder, and an LLNM-Net evaluate message asking for drawn-else-predicted masks
    finds a thyroid mask in site-c's views where the drawn masks give none."""
    out = tmp_path / "run"
    config = _experiment(tmp_path, partial_consortium)
    done = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Dice thyroid/nodule" in done.stdout and "nothing to train at site-c" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["idle"] for r in metrics["rounds"]] == [["site-c"], ["site-c"]]
    assert all(r["participants"] == ["site-a", "site-b"] for r in metrics["rounds"])
    final = metrics["final"]
    for site in ("site-a", "site-b"):
        assert final["sites"][site]["thyroid"]["n"] > 0 and 0 <= final["sites"][site]["thyroid"]["dice"] <= 1
    assert final["sites"]["site-c"]["n"] == 0 and final["sites"]["site-c"]["dice"] is None
    assert final["pooled"]["thyroid"]["n"] == sum(final["sites"][s]["thyroid"]["n"] for s in ("site-a", "site-b"))
    assert metrics["best_round_rule"]["criterion"] == "pooled val mean Dice"
    assert list((out / "tensorboard").glob("events.*")), "the Dice curves are tracked"
    sidecar = json.loads(next((out / "checkpoints").glob("round-0002.json")).read_text())
    assert sidecar["task"] == "segment" and sidecar["segmenter_config"]["image_size"] == 32
    report = subprocess.run([str(BIN / "llnm-server"), "report", str(out)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "nodule Dice" in (out / "report.html").read_text() and "site-c" in (out / "model_card.md").read_text()

    site_c = partial_consortium / "site-c"
    before = tree_digest(site_c)
    cache = tmp_path / "site-cache"
    segmented = subprocess.run([str(BIN / "llnm-site"), "segment", "--model", str(out), "--data", str(site_c),
                                "--cache-dir", str(cache)], capture_output=True, text=True, timeout=300)
    assert segmented.returncode == 0, segmented.stderr
    sha = json.loads(segmented.stdout.strip().splitlines()[-1])["segmenter_sha256"]
    assert tree_digest(site_c) == before, "llnm-site segment wrote into the site folder"
    assert list(cache.glob("predicted-masks/site-c-*/masks/*.png"))

    from fl_server.strategies import initial_state, round_config

    llnm = load_config(ROOT / "configs" / "demo.yaml", {"data": {"root": str(partial_consortium)},
                                                         "evaluation": {"explain": False}})
    predicted = llnm.model_copy(update={"preprocess": llnm.preprocess.model_copy(
        update={"masks": "drawn-else-predicted", "segmenter_sha256": sha})})
    node = {"data-path": str(site_c), "privacy-state-dir": str(tmp_path / "state"), "cache-dir": str(cache),
            "threads": 1, "exact-evaluation": True}
    run = deliver(tmp_path / "llnm", node, [
        {"type": "evaluate", "config": {**round_config(exp, 1, split="test", run_id="llnm"), protocol.SERVER_ROUND: 1},
         "arrays": initial_state(exp)} for exp in (llnm, predicted)])
    drawn, with_predicted = run.replies
    assert drawn.error is None and with_predicted.error is None, run.log[-3000:]
    assert sum(drawn.metrics[protocol.POP_THYROID_MASKS]) == 0
    assert sum(with_predicted.metrics[protocol.POP_THYROID_MASKS]) > 0
    assert tree_digest(site_c) == before
