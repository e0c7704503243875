"""A coordinator who attacks its sites: every message it can send, against the real ClientApp in its own process.

The coordinator controls the run configuration and the ServerApp, hence every train and evaluate message a site
receives, but not the site's node config (its policy) or its approvals. Each test plays one attack against real
site processes (`site_process.deliver`: the deployed `fl_client.client_app:app`, as `flwr-clientapp` loads it)
on the shared synthetic consortium, and checks that the site reveals no more than its guarantee states:

* the crafted-model read-out of validation patients (a model whose score is an indicator of one age);
* a retried round with changed settings, which must reproduce the release bit for bit or be refused;
* nominal DP (a tiny noise multiplier, a huge clipping norm), a raised target between rounds, and a lifetime
  budget without require-patient-dp;
* the one-patient lifetime bit (whether a returning patient is present must not change what the site does);
* a site's fake epsilon claim, which the coordinator must catch (the attacker is then a site).

The attack code stays here so that it stays run. The attacker's messages use a feature head on the clinical
variables only (no images or reports): the site's code path is the same, and the site computes it in seconds.
Every attack's messages go to one site process (`attacks`, below), each message with the node config of the
site it attacks: a site's state between messages is its node config and its privacy records on disk, exactly
what a fresh `flwr-clientapp` process per message would find.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from site_process import SiteRun, deliver

from shared_model import protocol
from shared_model.config import PatientDPConfig, PreprocessConfig, TrainConfig
from shared_model.config.inputs import InputsConfig
from shared_model.dp_accounting import epsilon_for, gaussian_sigma
from shared_model.model.configuration import ModelConfig

BIN = Path(sys.executable).parent
INPUTS = InputsConfig(images=False, reports=False)
PRE = PreprocessConfig(inputs=INPUTS)
HEAD = ModelConfig.preset("tiny", architecture="feature-head", images=False, reports=False, feature_centring="none",
                          num_clinical=len(INPUTS.token_levels), clinical_levels=INPUTS.token_levels)
AGE_CENTER, AGE_SCALE = 45.0, 15.0  # the paper's age token (shared_model.config.inputs.PAPER_CLINICAL)
AGES = range(18, 91)


def round_config(run: str, rnd: int, total: int, *, privacy: PatientDPConfig | None = None, split: str = "val",
                 train: TrainConfig | None = None, model: ModelConfig = HEAD, **extra: Any) -> dict[str, Any]:
    """A round config as the coordinator's ServerApp sends it (`fl_server.strategies.round_config`)."""
    return {protocol.RUN_ID: run, protocol.SERVER_ROUND: rnd, protocol.TOTAL_ROUNDS: total,
            protocol.MODEL_CONFIG: model.to_json(), protocol.PREPROCESS_CONFIG: PRE.to_json(),
            protocol.TRAIN_CONFIG: (train or TrainConfig(batch_size=8, lr=0.05, seed=3)).to_json(),
            protocol.PRIVACY_CONFIG: (privacy or PatientDPConfig()).to_json(), protocol.EVAL_SPLIT: split,
            protocol.EVAL_BOOTSTRAP: 0, **extra}


def head_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from shared_model.model.architectures import build_model

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(HEAD).state_dict().items()}


def age_indicator(age: int) -> dict[str, torch.Tensor]:
    """A crafted head: probability ~1 for a patient aged exactly `age`, ~0 otherwise (two tanh edges)."""
    state = {k: torch.zeros_like(v) for k, v in head_state().items()}
    sharp = 50.0
    for unit, edge in ((0, age - 0.5), (1, age + 0.5)):
        state["scalar_in.weight"][unit, 0] = sharp
        state["scalar_in.bias"][unit] = -sharp * (edge - AGE_CENTER) / AGE_SCALE
    state["scalar_out.weight"][0, 0], state["scalar_out.weight"][0, 1] = 10.0, -10.0
    state["scalar_out.bias"][0] = -10.0
    return state


def patients(site: Path) -> list[dict[str, str]]:
    with open(site / "patients.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def refusals(run: SiteRun) -> list[str]:
    return [r.error for r in run.replies if r.error]


def site_config(site: Path, state: Path, **policy: Any) -> dict[str, Any]:
    return {"data-path": str(site), "privacy-state-dir": str(state), "threads": 1, **policy}


# ---- 1. evaluation as a read-out ---------------------------------------------------------------------------
def read_out(run: SiteRun) -> dict[int, np.ndarray]:
    """The attacker's transcript: for each age whose query was answered, the (negative, positive) count of the
    top score bin, i.e. of the patients of exactly that age."""
    out = {}
    for age, reply in zip(AGES, run.replies, strict=True):
        if reply.error is None:
            out[age] = np.array([reply.metrics[protocol.HIST_NEG_COUNTS][-1],
                                 reply.metrics[protocol.HIST_POS_COUNTS][-1]], dtype=float)
    return out


def reconstruct(transcript: dict[int, np.ndarray], truth: list[tuple[int, int]]) -> int:
    """How many patients the strongest adversary recovers exactly: for each target it knows every other patient
    (DP's adversary), subtracts them from the transcript and guesses the (age, label) with the largest residual."""
    hits = 0
    for i, target in enumerate(truth):
        residual = {a: c.copy() for a, c in transcript.items()}
        for j, (age, label) in enumerate(truth):
            if j != i and age in residual:
                residual[age][label] -= 1
        if not residual:
            continue
        guess = max(((a, y) for a in residual for y in (0, 1)), key=lambda g: residual[g[0]][g[1]])
        hits += guess == target
    return hits


READ_OUT_BUDGET, READ_OUT_PER_REPLY = 2.0, 0.5


def read_out_messages(site: Path, node_config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "evaluate", "config": round_config("read-out", age, 100), "arrays": age_indicator(age),
             "node_config": node_config} for age in AGES]


def test_a_crafted_model_reads_out_exact_replies_but_not_dp_ones(attacks: dict[str, Any],
                                                                 small_consortium: Path) -> None:
    """The audit's read-out: one message per age, each with a model that scores 1 only at that age, reads every
    validation patient's age and label off exact replies (a site that opted out of DP evaluation). Against the
    default DP replies the same attack recovers no more than the reconstruction bound of the site's accounted
    evaluation epsilon allows, and the site stops answering at its budget."""
    from scipy.stats import binom

    site = small_consortium / "site-a"
    truth = [(int(p["age"]), int(p["llnm"])) for p in patients(site) if p["split"] == "val"]
    dp = attacks["read-out dp"]
    # Reconstruction bound (Balle et al. 2022): against an (eps, delta)-DP release, an adversary recovers a target
    # drawn from a prior with largest mass kappa with probability at most e^eps kappa + delta. The prior here is
    # the consortium's own (age, label) frequencies; eps is what the site's policy allows (its evaluation
    # budget); the assertion allows the binomial 99.9% quantile of that.
    everyone = [(int(p["age"]), int(p["llnm"])) for s in sorted(small_consortium.glob("site-*"))
                for p in patients(s)]
    kappa = max(everyone.count(v) for v in set(everyone)) / len(everyone)
    p_bound = min(1.0, math.exp(READ_OUT_BUDGET) * kappa + 1e-5)
    recovered = reconstruct(read_out(dp), truth)
    assert recovered <= binom.ppf(0.999, len(truth), p_bound) < len(truth), (recovered, p_bound)
    # The site stopped answering at its budget, and charged every reply it sent.
    answered = [r for r in dp.replies if r.error is None]
    sigma = gaussian_sigma(READ_OUT_PER_REPLY, 1e-5)
    spent = epsilon_for([(sigma, 1.0, 1)] * len(answered), 1e-5, "rdp")
    assert 0 < len(answered) < len(AGES) and spent <= READ_OUT_BUDGET
    assert all("max-eval-epsilon=2" in e for e in refusals(dp)), refusals(dp)[:1]
    assert all(r.metrics[protocol.EVAL_DP_SIGMA] == pytest.approx(sigma) for r in answered)
    assert all(r.metrics[protocol.HIST_N_BINS] <= 10 for r in answered)
    exact = attacks["read-out exact"]
    assert not refusals(exact)
    assert reconstruct(read_out(exact), truth) == len(truth) >= 5  # every patient, exactly
    listed = subprocess.run([str(BIN / "llnm-site"), "privacy", "--data", str(site), "--privacy-state-dir",
                             str(attacks["dir"] / "read-out-exact"), "--json"], capture_output=True, text=True,
                            timeout=120)
    summary = json.loads(listed.stdout)
    (run,) = summary["runs"]
    assert run["run_id"] == "read-out" and len(run["exact_evaluations"]) == len(AGES)
    assert "Traceback" not in attacks["log"] and "refused a evaluate message: site policy" in attacks["log"]


# ---- 2. a retried round must replay its release or be refused --------------------------------------------------
DP_TARGET = PatientDPConfig(enabled=True, target_epsilon=2.0, max_grad_norm=1.0)
CHANGES = {
    "proximal-mu": {protocol.PROXIMAL_MU: 0.01},
    "stage loss weight": {"train": TrainConfig(batch_size=8, lr=0.05, seed=3, stage_loss_weight=0.7)},
    "learning rate": {"train": TrainConfig(batch_size=8, lr=0.06, seed=3)},
    "model setting (dropout)": {"model": HEAD.model_copy(update={"dropout": 0.3})},
    "trainable mask": {"privacy": DP_TARGET.model_copy(update={"trainable": "heads"})},
    "update transport": {protocol.UPDATE_TRANSPORT: "float32"},
}


def _retry(change: dict[str, Any], *, privacy: PatientDPConfig = DP_TARGET) -> dict[str, Any]:
    kw: dict[str, Any] = {"privacy": change.get("privacy", privacy)}
    for key in ("train", "model"):
        if key in change:
            kw[key] = change[key]
    extra = {k: v for k, v in change.items() if k not in ("privacy", "train", "model")}
    return {"type": "train", "config": round_config("retry", 1, 1, **kw, **extra), "arrays": head_state()}


def retry_messages(node_config: dict[str, Any]) -> list[dict[str, Any]]:
    first = _retry({})
    return [{**m, "node_config": node_config} for m in [first, first, *(_retry(c) for c in CHANGES.values())]]


def fresh_noise_messages(node_config: dict[str, Any]) -> list[dict[str, Any]]:
    fixed = PatientDPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    return [{**m, "node_config": node_config} for m in (_retry({}, privacy=fixed),
                                                       _retry({protocol.PROXIMAL_MU: 1e-6}, privacy=fixed))]


def test_a_retried_round_replays_its_release_bit_for_bit_or_is_refused(attacks: dict[str, Any]) -> None:
    """Round 1 of a run, then the same round again with each setting changed in turn: an identical retry
    reproduces the release bit for bit (free); every changed one is a new release with fresh noise, which the
    run's target cannot pay for: refused, nothing sent. (Before, the changed retries reused the first attempt's
    noise, were charged as new releases and were sent: their differences carried no noise at all.)"""
    run = attacks["retry"]
    attempt, replay, *changed = run.replies
    assert attempt.error is None and replay.error is None, attacks["log"][-3000:]
    assert replay.metrics[protocol.DP_REPLAYED] == 1
    assert all(torch.equal(attempt.arrays[k], replay.arrays[k]) for k in attempt.arrays)
    for name, reply in zip(CHANGES, changed, strict=True):
        assert reply.error is not None and reply.arrays is None, name
        assert reply.error.startswith(("patient-level privacy budget reached", "site policy")), (name, reply.error)


def test_a_changed_retry_never_reuses_the_noise(attacks: dict[str, Any]) -> None:
    """With a fixed noise multiplier (no target to refuse it), a changed retry is sent, but it is a new release
    with fresh noise: the two updates differ by the noise, not by the tiny change (cosine far below the 0.9999
    the audit measured), and the site charges both."""
    a, b = attacks["fresh noise"].replies
    assert a.error is None and b.error is None, attacks["log"][-3000:]
    assert b.metrics[protocol.DP_ATTEMPTS_ROUND] == 2 and b.metrics[protocol.DP_REPLAYED] == 0
    global_state = head_state()
    ua = torch.cat([(a.arrays[k] - global_state[k]).flatten() for k in global_state])
    ub = torch.cat([(b.arrays[k] - global_state[k]).flatten() for k in global_state])
    cosine = float(torch.nn.functional.cosine_similarity(ua, ub, dim=0))
    assert cosine < 0.99, cosine
    assert b.metrics[protocol.DP_STEPS_TOTAL] == 2 * a.metrics[protocol.DP_STEPS_TOTAL]


# ---- 3. nominal DP, a raised target, a budget without require-patient-dp ------------------------------------
def floor_messages(node_config: dict[str, Any], budget_only: dict[str, Any]) -> list[dict[str, Any]]:
    nominal = PatientDPConfig(enabled=True, noise_multiplier=0.02, max_grad_norm=1.0)
    huge_clip = PatientDPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1000.0)
    target_1 = PatientDPConfig(enabled=True, target_epsilon=1.0)
    messages = [
        round_config("nominal", 1, 2, privacy=nominal),
        round_config("nominal", 1, 2, privacy=huge_clip),
        round_config("raise", 1, 2, privacy=target_1),
        # Round 2 of the same run at another target: refused, whatever the site's own cap.
        round_config("raise", 2, 2, privacy=target_1.model_copy(update={"target_epsilon": 2.5})),
        round_config("raise-more", 1, 2, privacy=target_1.model_copy(update={"target_epsilon": 500.0})),
    ]
    return [*({"type": "train", "config": c, "arrays": head_state(), "node_config": node_config} for c in messages),
            {"type": "train", "config": round_config("no-dp", 1, 1), "arrays": head_state(),
             "node_config": budget_only}]


def test_the_sites_floor_refuses_nominal_dp_and_a_raised_target(attacks: dict[str, Any]) -> None:
    """require-patient-dp used to accept z = 0.02 and C = 1000, and a run's target could be raised between rounds.
    The site's floor (min-noise-multiplier, max-clipping-norm, max-run-epsilon) and the run's pinned DP terms
    refuse them."""
    nominal_r, clip_r, first, raised, cap, _ = attacks["floor"].replies
    assert "min-noise-multiplier=0.5" in nominal_r.error and "noise_multiplier is 0.02" in nominal_r.error
    assert "max-clipping-norm=5" in clip_r.error
    assert first.error is None and first.metrics[protocol.DP_EPSILON] <= 1.0 + 1e-9, attacks["log"][-2000:]
    assert "DP terms of run 'raise' are fixed" in raised.error and "target_epsilon 1.0 -> 2.5" in raised.error
    assert "max-run-epsilon=3" in cap.error and "target_epsilon=500" in cap.error


def test_a_lifetime_budget_implies_patient_dp(attacks: dict[str, Any]) -> None:
    """`max-patient-epsilon` alone used to accept a round with DP off, which sends the exact loss, steps and
    count: the budget now implies require-patient-dp."""
    reply = attacks["floor"].replies[-1]
    assert reply.error is not None and "require-patient-dp=true needs patient-level DP" in reply.error
    assert not reply.metrics


def test_refusals_are_logged_as_refusals_and_name_no_local_path(attacks: dict[str, Any],
                                                                small_consortium: Path) -> None:
    """A refusal leaves as the error reply in the site's words: the site's log says "refused", with no
    traceback, and no refusal names the site's folders."""
    log = attacks["log"]
    assert "Traceback" not in log and "raised an exception" not in log
    assert log.count("refused a train message: site policy") >= 5
    errors = [r.error for run in attacks.values() if isinstance(run, SiteRun) for r in run.replies if r.error]
    assert errors and not [e for e in errors if str(small_consortium) in e or str(attacks["dir"]) in e]


# ---- 4. the one-patient lifetime bit ---------------------------------------------------------------------------
def clinical_site(source: Path, dest: Path, keep: set[str]) -> Path:
    """A site folder holding only the clinical table of `source`'s patients in `keep` (the attacker's inputs)."""
    dest.mkdir(parents=True)
    columns = ["patient_id", "age", "sex", "llnm", "risk_stage", "split"]
    with open(dest / "patients.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: p[c] for c in columns} for p in patients(source) if p["patient_id"] in keep)
    (dest / "site.yaml").write_text(f"name: {source.name}\ninputs:\n  images: false\n  reports: false\n",
                                    encoding="utf-8")
    return dest


RETURNING_DP = PatientDPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)


def returning_messages(source: Path, base: Path) -> list[dict[str, Any]]:
    """Per variant (without / with the returning patient): run 1 on patients A, then run 2 on patients B under
    a lifetime budget above run 2 alone but below both runs together."""
    train = [p["patient_id"] for p in patients(source) if p["split"] == "train"]
    evaluated = {p["patient_id"] for p in patients(source) if p["split"] != "train"}
    old, new = set(train[: len(train) // 2]), set(train[len(train) // 2:])
    returning = sorted(old)[0]
    # Run 2 alone costs epsilon_for of its steps (the public count is the site's, rounded): the budget is 1.2x that.
    from shared_model.dp_accounting import opacus_sampling
    from shared_model.sitedata.contract import coarse_count

    q, steps = opacus_sampling(coarse_count(len(new) + 1), 8)
    budget = round(1.2 * epsilon_for([(1.0, q, steps)], 1e-5, "rdp"), 4)
    out = []
    for with_returning in (False, True):
        tmp = base / f"returning-{with_returning}"
        first = clinical_site(source, tmp / "first" / source.name, old | evaluated)
        later = clinical_site(source, tmp / "later" / source.name,
                              new | evaluated | ({returning} if with_returning else set()))
        state = tmp / "state"
        out += [{"type": "train", "config": round_config("run-1", 1, 1, privacy=RETURNING_DP), "arrays": head_state(),
                 "node_config": site_config(first, state)},
                {"type": "train", "config": round_config("run-2", 1, 1, privacy=RETURNING_DP), "arrays": head_state(),
                 "node_config": site_config(later, state, **{"max-patient-epsilon": budget})}]
    return out


def test_whether_one_returning_patient_is_present_changes_nothing_sent(attacks: dict[str, Any]) -> None:
    """The audit's one-patient bit: a site trained run 1 on patients A; now it trains on other patients B, with or
    without one patient of A returning. An older ledger used to be composed in only when it shared a patient, so
    the lifetime epsilon in every reply, and whether the site refused under its budget, told whether that one
    patient was there. Now every ledger of the site is composed: the replies carry no lifetime figure, and the
    refusal decision is the same either way."""
    a1, a2, b1, b2 = attacks["returning"].replies
    assert a1.error is None and b1.error is None, attacks["log"][-2000:]
    assert a2.error is not None and b2.error is not None  # the same decision: both refuse
    assert a2.error.split("(")[0] == b2.error.split("(")[0]
    for reply in (a1, b1):
        assert not [k for k in reply.metrics if "lifetime" in k or "budget" in k]
        assert set(reply.metrics) == set(a1.metrics)


@pytest.fixture(scope="module")
def attacks(tmp_path_factory: pytest.TempPathFactory, small_consortium: Path) -> dict[str, Any]:
    """Every attack's messages, in one real site process; the replies grouped by attack."""
    base = tmp_path_factory.mktemp("attacks")
    a, b, c = (small_consortium / s for s in ("site-a", "site-b", "site-c"))
    scenarios = {
        "read-out exact": read_out_messages(a, site_config(a, base / "read-out-exact", **{"exact-evaluation": True})),
        "read-out dp": read_out_messages(a, site_config(a, base / "read-out-dp", **{
            "eval-epsilon": READ_OUT_PER_REPLY, "max-eval-epsilon": READ_OUT_BUDGET})),
        "retry": retry_messages(site_config(b, base / "retry")),
        "fresh noise": fresh_noise_messages(site_config(b, base / "fresh-noise")),
        "floor": floor_messages(site_config(c, base / "floor", **{"min-noise-multiplier": 0.5,
                                                                  "max-clipping-norm": 5.0, "max-run-epsilon": 3.0}),
                                site_config(c, base / "budget-only", **{"max-patient-epsilon": 6.0})),
        "returning": returning_messages(a, base / "returning"),
    }
    messages = [m for group in scenarios.values() for m in group]
    run = deliver(base / "process", {}, messages, timeout=900)
    out: dict[str, Any] = {"log": run.log, "dir": base, "seconds": run.seconds}
    at = 0
    for name, group in scenarios.items():
        out[name] = SiteRun(run.replies[at:at + len(group)], run.log, run.seconds)
        at += len(group)
    return out


# ---- 5. a site's fake epsilon claim ----------------------------------------------------------------------------
@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a process that builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _reply(metrics: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    reply = Message(RecordDict({"x": ConfigRecord({"y": 1})}), dst_node_id=1, message_type="train")
    reply.content = RecordDict({protocol.METRICS_RECORD: MetricRecord(metrics),
                                protocol.SITE_RECORD: ConfigRecord({protocol.SITE_NAME: "site-z"})})
    return reply


def honest_metrics(z: float, q: float, steps: int, total: int, *, epsilon: float | None = None,
                   public: int = 80) -> dict[str, Any]:
    eps = epsilon if epsilon is not None else epsilon_for([(z, q, total)], 1e-5, "rdp")
    # A site that fakes its claim sends every key a coordinator might check, consistent with the claim (the
    # lifetime figures of earlier versions included).
    old_keys = {"dp-budget-epsilon": math.nan, "dp-lifetime-epsilon": eps, "dp-lifetime-delta": 1e-5,
                "dp-lifetime-runs": 1}
    return {**old_keys, protocol.NUM_EXAMPLES: public, protocol.UNIT_WEIGHT: 1,
            protocol.DP_EPSILON: epsilon if epsilon is not None else epsilon_for([(z, q, total)], 1e-5, "rdp"),
            protocol.DP_DELTA: 1e-5, protocol.DP_NOISE_MULTIPLIER: z, protocol.DP_SAMPLE_RATE: q,
            protocol.DP_MAX_GRAD_NORM: 1.0, protocol.DP_STEPS_ROUND: steps, protocol.DP_STEPS_TOTAL: total,
            protocol.DP_REPLAYED: 0, protocol.DP_ATTEMPTS_ROUND: 1, protocol.DP_HISTORY_SEGMENTS: 1,
            protocol.DP_HISTORY_NOISE: [z], protocol.DP_HISTORY_RATE: [q], protocol.DP_HISTORY_STEPS: [total]}


@pytest.mark.usefixtures("task_identity")
def test_the_coordinator_recomputes_every_reported_epsilon() -> None:
    """The audit's fake claim: z = 0.01, q = 1 and 1,000 steps reported as epsilon 0.5 (the true RDP epsilon is
    about 5.5e6). The coordinator recomputes each epsilon from the mechanism reported with it and rejects the
    reply; an honest one passes; a sample rate that is not DP-SGD's for the public count and batch size, or
    steps that do not add up, are rejected too."""
    from fl_server.privacy.replies import dp_reply_record
    from shared_model.dp_accounting import opacus_sampling

    fake_cfg = PatientDPConfig(enabled=True, noise_multiplier=0.01)
    problem, _ = dp_reply_record(_reply(honest_metrics(0.01, 1.0, 1000, 1000, epsilon=0.5, public=8)), fake_cfg)
    assert problem is not None and "does not follow from the mechanism" in problem
    assert epsilon_for([(0.01, 1.0, 1000)], 1e-5, "rdp") > 1e6

    cfg = PatientDPConfig(enabled=True, target_epsilon=8.0)
    train = TrainConfig(batch_size=16, local_epochs=1)
    q, steps = opacus_sampling(80, 16)
    assert dp_reply_record(_reply(honest_metrics(1.3, q, steps, 2 * steps)), cfg, train, rounds_trained=1)[0] is None
    bad_rate = dp_reply_record(_reply(honest_metrics(1.3, 0.01, steps, steps)), cfg, train)[0]
    assert bad_rate is not None and "is not DP-SGD's rate" in bad_rate
    forgot = dp_reply_record(_reply(honest_metrics(1.3, q, steps, steps)), cfg, train, rounds_trained=3)[0]
    assert forgot is not None and "fewer than the 4 round(s)" in forgot


@pytest.mark.usefixtures("task_identity")
def test_a_rejected_claim_is_in_the_ledger_and_the_status(tmp_path: Path) -> None:
    from processes import demo_experiment

    from fl_server.config import parse_config
    from fl_server.privacy import PrivacyLedger
    from fl_server.run_dir import RunDirectory

    exp_dict = demo_experiment()
    exp_dict["name"] = "fake-claim"
    exp_dict["federation"]["rounds_per_epoch"] = 1
    exp_dict["train"]["batch_size"] = 8
    exp_dict["privacy"] = {"patient": {"enabled": True, "noise_multiplier": 0.01}}
    exp = parse_config(exp_dict)
    rd = RunDirectory(tmp_path / "run")
    rd.create(exp, {"mode": "test", "status": "running"})
    ledger = PrivacyLedger.open(rd, exp)
    failures: list[dict[str, Any]] = []
    kept = ledger.screen_replies(1, [_reply(honest_metrics(0.01, 1.0, 1, 1, epsilon=0.5, public=8))], failures,
                                 lambda n: f"node-{n}")
    assert kept == [] and "does not follow from the mechanism" in failures[0]["reason"]
    rec = json.loads(rd.privacy_path.read_text())["rounds"][0]["sites"]["site-z"]
    assert rec["status"] == "rejected"
    ledger.after_aggregate(1, ledger.strategy, [], lambda n: f"node-{n}")
    status = subprocess.run([str(BIN / "llnm-server"), "status", str(rd.path)], capture_output=True, text=True,
                            timeout=120)
    assert "REJECTED site-z's update" in status.stdout and "does not follow" in status.stdout, status.stdout
