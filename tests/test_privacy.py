"""Differential privacy at two levels: site DP-SGD (Opacus) with its persisted accountant history, Flower's
site-level wrappers and accountant, and the run's privacy ledger, every epsilon of which is recomputed here
with Google's `dp-accounting` (independent of Opacus and of the code under test)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from processes import demo_experiment
from torch.utils.data import TensorDataset

from fl_client.privacy import (
    DP_METRIC_KEYS,
    PatientBudgetExceeded,
    PatientDPSession,
    PrivacyStateError,
    epsilon_for,
    opacus_sampling,
    site_dp_clipping_mod,
)
from fl_client.privacy.history import data_id, ledger_path, patient_digests
from fl_client.settings import SiteSettings
from shared_model.model.modeling import LLNMNet, ModelConfig
from shared_model.model.training import TrainConfig, train_local, trainable_state

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DELTA = 1e-5

logging.getLogger("absl").setLevel(logging.ERROR)


# ---- independent accounting (dp-accounting) ------------------------------------------------------------
def dp_sgd_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps, by dp-accounting's RDP accountant."""
    from dp_accounting import dp_event, rdp

    acct = rdp.RdpAccountant()
    acct.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps))
    return float(acct.get_epsilon(delta))


def gaussian_epsilon(z: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian releases without sampling amplification (add-or-remove-one)."""
    from dp_accounting import dp_event, rdp

    acct = rdp.RdpAccountant()
    acct.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), releases))
    return float(acct.get_epsilon(delta))


def close(a: float, b: float, rtol: float = 0.01) -> bool:
    return abs(a - b) <= rtol * abs(b)


# ---- a small training set in the model's batch layout ----------------------------------------------------
TINY = ModelConfig.preset("tiny", image_size=32, text_max_length=8)


def patient_tensors(n: int, seed: int = 0) -> TensorDataset:
    """`n` patients in LLNMDataset's tuple layout (random values, the real model and Opacus consume them)."""
    g = torch.Generator().manual_seed(seed)
    s, length, d, c = TINY.image_size, TINY.text_max_length, TINY.text_dim, TINY.num_clinical
    return TensorDataset(
        torch.rand(n, 2, 3, s, s, generator=g), torch.ones(n, 2), torch.randn(n, length, d, generator=g),
        torch.ones(n, length), torch.randn(n, 2, c, generator=g), torch.ones(n, 2, c),
        torch.randint(0, 2, (n,), generator=g).float(), torch.randint(0, 3, (n,), generator=g),
    )


def ids(n: int) -> list[str]:
    """Patient ids of `n` training patients (they pick the site's ledger)."""
    return [f"P{i:04d}" for i in range(n)]


def ledger_file(tmp: Path, n: int, site: str = "a") -> Path:
    """The lifetime ledger of site `site` training `n` patients (`ids(n)`), under `settings_for(tmp)`."""
    return ledger_path(tmp / "privacy-state", site, data_id(patient_digests(ids(n))))


def is_run(run_id: str, name: str) -> bool:
    """A run of experiment `name`: its id at the sites is the name, made unique by its run directory."""
    return run_id == name or run_id.startswith(f"{name}-")


def run_releases(ledger: dict, run: str, rnd: int | None = None) -> list[dict]:
    return [r for r in ledger["releases"] if is_run(r["run_id"], run) and (rnd is None or r["round"] == rnd)]


def settings_for(tmp: Path, *, budget: float | None = None) -> SiteSettings:
    site = tmp / "site-data"
    site.mkdir(exist_ok=True)
    return SiteSettings(data_path=site, name=None, cache_dir=None, device="cpu", max_patient_epsilon=budget,
                        privacy_state_dir=tmp / "privacy-state")


def privacy_cfg(**kw: object) -> dict:
    cfg = {"enabled": True, "target_epsilon": None, "delta": DELTA, "noise_multiplier": 1.2, "max_grad_norm": 1.0,
           "accountant": "rdp"}
    cfg.update(kw)
    return cfg


def train_round(settings: SiteSettings, data: TensorDataset, state: dict, rnd: int, *, pcfg: dict,
                batch_size: int = 8, epochs: int = 1, rounds: int = 3, run: str = "unit-run", site: str = "a"
                ) -> tuple[dict, dict]:
    """One site's DP round exactly as the ClientApp runs it; returns (dp metrics, trained state)."""
    model = LLNMNet(TINY)
    model.load_state_dict(state)
    session = PatientDPSession.open(site_name=site, run_id=run, settings=settings, privacy_cfg=pcfg,
                                    train_patient_ids=ids(len(data)), batch_size=batch_size, local_epochs=epochs,
                                    total_rounds=rounds, server_round=rnd)
    cfg = TrainConfig(batch_size=batch_size, local_epochs=epochs, seed=1000 + rnd, device="cpu", lr=1e-3)
    result = train_local(model, data, cfg, global_state=state, hooks=session.hooks())
    return session.finish(result), trainable_state(model)


# ---- unit level --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "batch"), [(40, 8), (93, 1), (5, 32), (100, 32), (211, 7)])
def test_sampling_plan_is_what_opacus_runs(n: int, batch: int) -> None:
    from opacus.data_loader import DPDataLoader

    q, steps = opacus_sampling(n, batch)  # n is the public count here
    dp_loader = DPDataLoader(TensorDataset(torch.zeros(3 * n, 1)), sample_rate=q)  # any real size
    assert steps == len(dp_loader) == math.ceil(n / min(batch, n)) - (n == 93)  # 1 / (1 / 93) rounds down
    assert q == 1 / len(dp_loader) == dp_loader.sample_rate  # sampled and accounted alike


def test_site_dp_sgd_persists_replays_and_refuses(tmp_path: Path) -> None:
    """Round 1 here, round 2 in another process, an identical retry of round 2 here (replayed, not counted),
    then a site budget that round 3 would exceed: refused with the site, the budget and the round's cost, but
    not the lifetime epsilon of its patients, which stays on the site."""
    data = patient_tensors(24)
    settings = settings_for(tmp_path)
    pcfg = privacy_cfg()
    torch.manual_seed(0)
    state0 = trainable_state(LLNMNet(TINY))
    m1, state1 = train_round(settings, data, state0, 1, pcfg=pcfg)
    assert tuple(m1) == DP_METRIC_KEYS
    q, steps = opacus_sampling(24, 8)
    assert (m1["dp-sample-rate"], m1["dp-steps-round"], m1["dp-steps-total"]) == (q, steps, steps)
    assert close(m1["dp-epsilon"], dp_sgd_epsilon(q, 1.2, steps, DELTA))

    # Round 2 in a fresh process (as every Flower round is), from the history file only. Same torch threads as
    # here: a site's release is bit-for-bit reproducible (and so replayable, below) on the same thread count.
    torch.save({"data": data.tensors, "state": state1}, tmp_path / "inputs.pt")
    script = f"""
import json, sys, torch
from pathlib import Path
torch.set_num_threads({torch.get_num_threads()})
from torch.utils.data import TensorDataset
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_privacy as t
tmp = Path({str(tmp_path)!r})
blob = torch.load(tmp / "inputs.pt")
metrics, state = t.train_round(t.settings_for(tmp), TensorDataset(*blob["data"]), blob["state"], 2,
                               pcfg=t.privacy_cfg())
torch.save(state, tmp / "state2.pt")
print(json.dumps(metrics))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    m2 = json.loads(res.stdout.strip().splitlines()[-1])
    assert m2["dp-steps-total"] == 2 * steps and m2["dp-epsilon"] > m1["dp-epsilon"]
    assert close(m2["dp-epsilon"], dp_sgd_epsilon(q, 1.2, 2 * steps, DELTA))
    ledger = json.loads(ledger_file(tmp_path, 24).read_text())
    assert [r["round"] for r in run_releases(ledger, "unit-run")] == [1, 2]

    # The coordinator crashed and resumes round 2 with the same global model: the site reproduces its
    # release bit for bit (same secret seeds), so nothing more is spent.
    m2b, state2b = train_round(settings, data, state1, 2, pcfg=pcfg)
    assert m2b["dp-replayed"] == 1 and m2b["dp-attempts-round"] == 1
    assert m2b["dp-epsilon"] == m2["dp-epsilon"] and m2b["dp-steps-total"] == 2 * steps
    state2 = torch.load(tmp_path / "state2.pt")
    assert all(torch.equal(state2[k], state2b[k]) for k in state2)

    # A retry of round 2 from a different model is a second release and is counted.
    m2c, _ = train_round(settings, data, state0, 2, pcfg=pcfg)
    assert m2c["dp-replayed"] == 0 and m2c["dp-attempts-round"] == 2 and m2c["dp-steps-total"] == 3 * steps
    assert close(m2c["dp-epsilon"], dp_sgd_epsilon(q, 1.2, 3 * steps, DELTA))

    # This hospital's own budget sits between what it spent and what round 3 would cost.
    after = dp_sgd_epsilon(q, 1.2, 4 * steps, DELTA)
    budget = round((m2c["dp-epsilon"] + after) / 2, 3)
    with pytest.raises(PatientBudgetExceeded) as err:
        train_round(settings_for(tmp_path, budget=budget), data, state2, 3, pcfg=pcfg)
    text = str(err.value)
    for part in ("'a'", f"lifetime max-patient-epsilon {budget:g}", "would take the lifetime epsilon of its patients",
                 "round 3", f"{steps} DP-SGD steps"):
        assert part in text, (part, text)
    assert f"{m2c['dp-epsilon']:.4f}" not in text and f"{after:.4f}" not in text
    refusals = json.loads(ledger_file(tmp_path, 24).read_text())["refusals"]
    assert refusals[-1]["round"] == 3 and refusals[-1]["budget"] == budget
    assert refusals[-1]["rule"] == "max-patient-epsilon"


def test_noise_calibrated_to_the_run_never_exceeds_the_target(tmp_path: Path) -> None:
    """target_epsilon: the noise multiplier is searched once for all planned steps, and the coordinator's
    target then caps the run (an extra round is refused)."""
    data = patient_tensors(12)
    settings = settings_for(tmp_path)
    pcfg = privacy_cfg(target_epsilon=4.0, noise_multiplier=None)
    torch.manual_seed(1)
    state = trainable_state(LLNMNet(TINY))
    eps = []
    for rnd in (1, 2):
        metrics, state = train_round(settings, data, state, rnd, pcfg=pcfg, batch_size=4, rounds=2, run="calib")
        eps.append(metrics["dp-epsilon"])
        q, z = metrics["dp-sample-rate"], metrics["dp-noise-multiplier"]
        assert close(metrics["dp-epsilon"], dp_sgd_epsilon(q, z, metrics["dp-steps-total"], DELTA))
    assert eps[0] < eps[1] <= 4.0 and eps[1] > 4.0 - 0.05  # the whole budget is used, not more
    with pytest.raises(PatientBudgetExceeded, match=r"coordinator's privacy\.patient\.target_epsilon 4"):
        train_round(settings, data, state, 3, pcfg=pcfg, batch_size=4, rounds=2, run="calib")


def test_empty_poisson_batches_are_noisy_steps(tmp_path: Path) -> None:
    """3 patients, batch 1: about 30% of Poisson batches are empty (P(no empty in 30) ~ 3e-5); each is still
    a noisy, accounted step, so the number of releases never depends on the data."""
    data = patient_tensors(3, seed=3)
    metrics, _ = train_round(settings_for(tmp_path), data, trainable_state(LLNMNet(TINY)), 1,
                             pcfg=privacy_cfg(noise_multiplier=2.0), batch_size=1, epochs=10, run="empty")
    assert metrics["dp-steps-round"] == 30 and metrics["dp-sample-rate"] == 1 / 3
    assert close(metrics["dp-epsilon"], dp_sgd_epsilon(1 / 3, 2.0, 30, DELTA))


def test_prv_accountant_agrees_with_dp_accounting_pld() -> None:
    from dp_accounting import dp_event, pld

    for q, z, steps in ((0.2, 1.0, 15), (1 / 3, 1.5, 30)):
        acct = pld.PLDAccountant()
        acct.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
                                                  steps))
        assert close(epsilon_for([(z, q, steps)], DELTA, "prv"), acct.get_epsilon(DELTA))


def test_unreadable_history_is_never_reset(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    path = ledger_file(tmp_path, 10)
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    with pytest.raises(PrivacyStateError, match="never silently reset"):
        PatientDPSession.open(site_name="a", run_id="broken", settings=settings, privacy_cfg=privacy_cfg(),
                              train_patient_ids=ids(10), batch_size=4, local_epochs=1, total_rounds=2,
                              server_round=1)
    assert path.read_text() == "{ not json"


def test_history_never_written_inside_the_site_folder(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    settings.privacy_state_dir = settings.data_path / "dp"
    with pytest.raises(ValueError, match="inside the site folder"):
        PatientDPSession.open(site_name="a", run_id="r", settings=settings, privacy_cfg=privacy_cfg(),
                              train_patient_ids=ids(10), batch_size=4, local_epochs=1, total_rounds=2,
                              server_round=1)
    assert not (settings.data_path / "dp").exists()


def test_client_side_clipping_mod_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's fixedclipping_mod runs on train replies that carry our extra ConfigRecord 'site'."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are addressed within a run; outside a Flower process the run identity must be set by hand.
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    sent = {"w": torch.zeros(10)}

    def train(msg: Message, ctxt: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((10,), 3.0)}),
                                   "metrics": MetricRecord({"unit-weight": 1}),
                                   "site": ConfigRecord({"site-name": "a"})}), reply_to=msg)

    def message(config: dict) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord(config)}),
                       dst_node_id=1, message_type="train")

    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    clipped = site_dp_clipping_mod(message({"clipping_norm": 2.0, "site-dp-clipping": "client-fixed"}), ctxt, train)
    assert not clipped.has_error()
    w = clipped.content["arrays"].to_numpy_ndarrays()[0]
    assert math.isclose(float(np.linalg.norm(w)), 2.0, rel_tol=1e-5)
    untouched = site_dp_clipping_mod(message({"clipping_norm": 2.0}), ctxt, train)
    assert np.allclose(untouched.content["arrays"].to_numpy_ndarrays()[0], 3.0)


def test_site_level_budget_stops_before_it_is_exceeded(tmp_path: Path) -> None:
    """Flower's accountant (fixed clipping) composes each release; before_round refuses the one too many."""
    from flwr.serverapp import GaussianPrivacyEvent
    from flwr.serverapp.strategy import FedAvg

    from fl_server.config import parse_config
    from fl_server.privacy import PrivacyLedger, SiteBudgetExhausted, wrap_with_site_dp
    from fl_server.run_dir import RunDirectory

    z = 1.5
    two, three = gaussian_epsilon(z, 2, DELTA), gaussian_epsilon(z, 3, DELTA)
    exp = parse_config({"name": "site-budget", "privacy": {"site": {
        "enabled": True, "clipping": "server-fixed", "noise_multiplier": z, "clipping_norm": 0.5,
        "max_epsilon": (two + three) / 2}}})
    strategy = wrap_with_site_dp(FedAvg(weighted_by_key="unit-weight"), exp, 4)
    rd = RunDirectory(tmp_path / "run")
    rd.path.mkdir()
    ledger = PrivacyLedger.open(rd, exp)
    ledger.attach(strategy)
    for _ in range(2):
        ledger.before_round(1, strategy)
        strategy.accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=4, population_size=4))
    assert close(strategy.privacy_spent().epsilon, two)
    with pytest.raises(SiteBudgetExhausted, match="max_epsilon"):
        ledger.before_round(3, strategy)
    assert json.loads(rd.privacy_path.read_text())["stopped"]["round"] == 3


# ---- a federated DP run (Flower simulation) -------------------------------------------------------------
SIM_SITES = ["site-a", "site-b", "site-c"]
PATIENT_Z = 1.0
SITE_Z, SITE_CLIP = 0.8, 2.0


def sim_config(tmp: Path, consortium: Path, budget_c: float) -> Path:
    exp = demo_experiment()
    exp["name"] = "dp-ledger-test"
    exp["evaluation"] = {"explain": False}
    exp["data"] = {"root": str(consortium), "sites": SIM_SITES}
    exp["train"].update({"batch_size": 8, "lr": 0.001})
    exp["federation"].update({"rounds": 2, "min_sites": 2, "eval_bootstrap": 0, "final_eval_split": None,
                              "round_timeout_s": 600})
    exp["simulation"].update({"cpus_per_site": 1, "site_node_config": {"site-c": {"max-patient-epsilon": budget_c}}})
    exp["privacy"] = {
        "patient": {"enabled": True, "noise_multiplier": PATIENT_Z, "max_grad_norm": 1.0, "delta": DELTA},
        "site": {"enabled": True, "clipping": "server-fixed", "noise_multiplier": SITE_Z, "clipping_norm": SITE_CLIP,
                 "delta": DELTA},
    }
    path = tmp / "dp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def site_c_budget(config: dict, consortium: Path) -> tuple[float, float]:
    """Site c's budget: above what one round costs it, below two; also the one-round epsilon."""
    from fl_server.config import parse_config
    from shared_model.sitedata.cache import build_site_tensors

    exp = parse_config(config)
    pre = exp.preprocess
    tensors = build_site_tensors(consortium / "site-c", pre, cache_dir=Path(os.environ["LLNM_CACHE_DIR"]),
                                 progress=False)
    public = yaml.safe_load((consortium / "site-c" / "site.yaml").read_text())["public_patient_count"]
    assert public >= len(tensors.subset("train"))  # declared by the synthetic site: its count rounded up
    q, steps = opacus_sampling(public, exp.train.batch_size)
    one, two = (epsilon_for([(PATIENT_Z, q, k * steps)], DELTA, "rdp") for k in (1, 2))
    return round((one + two) / 2, 4), one


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, small_consortium: Path) -> dict:
    tmp = tmp_path_factory.mktemp("dp-run")
    probe = yaml.safe_load(sim_config(tmp, small_consortium, 1.0).read_text())
    budget, one_round = site_c_budget(probe, small_consortium)
    config = sim_config(tmp, small_consortium, budget)
    out = tmp / "run"
    env = {**os.environ, "LLNM_PRIVACY_DIR": str(tmp / "privacy")}  # these sites' lifetime ledgers start here
    res = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    public_counts = {site: yaml.safe_load((small_consortium / site / "site.yaml").read_text())["public_patient_count"]
                     for site in SIM_SITES}
    return {"out": out, "stdout": res.stdout, "budget": budget, "one_round": one_round, "env": env,
            "public_counts": public_counts,
            "privacy_dir": tmp / "privacy", "ledger": json.loads((out / "privacy.json").read_text())}


def check_patient_epsilons(ledger: dict) -> None:
    """Every site's reported epsilon: recomputed by dp-accounting within 1%, cumulative, within budget."""
    previous: dict[str, float] = {}
    for entry in ledger["rounds"]:
        for name, rec in entry["sites"].items():
            if rec["status"] == "trained":
                assert rec["mechanism"] == "dp-sgd" and rec["accountant"] == "opacus-rdp"
                assert rec["history_segments"] == 1 and rec["delta"] == DELTA and rec["max_grad_norm"] == 1.0
                assert rec["steps_total"] == entry["round"] * rec["steps_round"]
                expected = dp_sgd_epsilon(rec["sample_rate"], rec["noise_multiplier"], rec["steps_total"], DELTA)
                assert close(rec["epsilon"], expected), (entry["round"], name, rec["epsilon"], expected)
            if rec.get("epsilon") is not None:
                assert rec["epsilon"] >= previous.get(name, 0.0), (name, entry["round"])
                previous[name] = rec["epsilon"]
            assert "lifetime_epsilon" not in rec  # that figure stays at the site


def check_server_epsilons(ledger: dict, first_release: int = 1) -> None:
    for i, entry in enumerate(ledger["rounds"]):
        server = entry["server"]
        assert server["mechanism"] == "gaussian" and server["clipping"] == "server-fixed"
        assert server["releases"] == first_release + i
        assert close(server["epsilon"], gaussian_epsilon(SITE_Z, server["releases"], DELTA))
        k = server["sites_aggregated"]
        assert math.isclose(server["noise_stddev"], SITE_Z * SITE_CLIP / k)


@pytest.mark.slow
def test_dp_run_ledger_matches_dp_accounting(dp_run: dict) -> None:
    ledger = dp_run["ledger"]
    assert [e["round"] for e in ledger["rounds"]] == [1, 2] and all(e["complete"] for e in ledger["rounds"])
    check_patient_epsilons(ledger)
    check_server_epsilons(ledger)
    # Site c has no budget for round 2: the other two are averaged, and the noise follows K = 2.
    assert [e["server"]["sites_aggregated"] for e in ledger["rounds"]] == [3, 2]
    assert [e["server"]["sites_sampled"] for e in ledger["rounds"]] == [3, 3]
    assert dp_run["stdout"].count("privacy: patient-level (") == 1
    assert "privacy: site-level (" in dp_run["stdout"]
    st = subprocess.run([str(BIN / "llnm-server"), "status", str(dp_run["out"])], capture_output=True, text=True)
    assert st.returncode == 0 and "privacy: patient-level (" in st.stdout and "privacy: site-level (" in st.stdout
    assert f"site-c: requires patient DP, lifetime max-patient-epsilon {dp_run['budget']:g}" in st.stdout
    assert "adjacency: add or remove one patient" in st.stdout
    assert "public patient count" in ledger["patient"]["adjacency"]
    # Each site's lifetime ledger survived its ClientApp processes, on the site's side.
    for site in SIM_SITES:
        (path,) = dp_run["privacy_dir"].glob(f"{site}-*__data-*.json")
        rounds = [r["round"] for r in run_releases(json.loads(path.read_text()), "dp-ledger-test")]
        assert rounds == ([1] if site == "site-c" else [1, 2])


@pytest.mark.slow
def test_site_over_its_own_budget_stops_and_others_continue(dp_run: dict) -> None:
    ledger, out = dp_run["ledger"], dp_run["out"]
    r1, r2 = (e["sites"]["site-c"] for e in ledger["rounds"])
    assert r1["status"] == "trained" and close(r1["epsilon"], dp_run["one_round"])
    assert r2["status"] == "refused" and r2["epsilon"] == pytest.approx(r1["epsilon"], abs=1e-4)
    assert r1["epsilon"] <= dp_run["budget"] == r1["policy"]["max-patient-epsilon"]
    assert f"max-patient-epsilon {dp_run['budget']:g}" in r2["reason"] and "site 'site-c'" in r2["reason"]
    assert "lifetime_epsilon" not in r2 and f"{dp_run['one_round']:.4f}" not in r2["reason"]
    metrics = json.loads((out / "metrics.json").read_text())
    round2 = metrics["rounds"][1]
    assert round2["participants"] == ["site-a", "site-b"]
    failure = next(f for f in round2["failures"] if f["site"] == "site-c")
    assert failure["reason"].startswith("patient-level privacy budget reached: site 'site-c' refuses round 2")
    log_text = (out / "log.txt").read_text()
    assert "patient-level privacy budget reached: site 'site-c' refuses round 2" in log_text
    assert "would take the lifetime epsilon of its patients" in log_text
    assert f"max-patient-epsilon {dp_run['budget']:g}" in log_text
    # The report's ledger table: every round, the refusal, each site's epsilons and the site-level one.
    from fl_server.report import build_report, render_html

    report = build_report(out)
    rows = report["privacy_ledger"]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["sites"]["site-c"]["status"] == "refused"
    assert close(rows[0]["sites"]["site-c"]["epsilon"], r1["epsilon"])
    assert rows[1]["site_level_epsilon"] == pytest.approx(ledger["rounds"][1]["server"]["epsilon"])
    table = render_html(report).split("<table id='privacy-ledger'>", 1)[1].split("</table>", 1)[0]
    assert "<td>refused</td>" in table and "site-level epsilon" in table


@pytest.mark.slow
def test_dp_train_replies_carry_only_what_the_guarantee_covers(dp_run: dict) -> None:
    """Under patient DP no exact training loss, timing, step count or patient count leaves a site
    (docs/privacy.md): num-examples is the site's declared public count, unit-weight is 1, and the dp-*
    accounting values are the mechanism's own."""
    from shared_model import protocol

    not_covered = {"train-loss", "patients-per-second", "train-seconds", "train-steps"}
    assert set(protocol.NON_DP_TRAIN_KEYS) == not_covered
    metrics = json.loads((dp_run["out"] / "metrics.json").read_text())
    entries = [(r["round"], name, m) for r in metrics["rounds"] for name, m in r["train"].items()]
    assert len(entries) == 5  # three sites in round 1, two in round 2
    for rnd, name, m in entries:
        assert not not_covered & set(m), (rnd, name, sorted(m))
        assert m["unit-weight"] == 1 and "dp-epsilon" in m and "dp-lifetime-epsilon" not in m
        assert set(m) == {"num-examples", "unit-weight", *protocol.DP_METRIC_KEYS}, sorted(m)
        assert m["num-examples"] == dp_run["public_counts"][name], (name, m["num-examples"])
    assert "round 2/2" in dp_run["stdout"]
    st = subprocess.run([str(BIN / "llnm-server"), "status", str(dp_run["out"]), "--json"], capture_output=True,
                        text=True)
    assert st.returncode == 0 and json.loads(st.stdout)["rounds_completed"] == 2, st.stderr


@pytest.fixture(scope="module")
def second_run(dp_run: dict, small_consortium: Path) -> dict:
    """Another run (new name, one round) on the same sites, with the same lifetime ledgers."""
    tmp = dp_run["out"].parent
    exp = yaml.safe_load((tmp / "dp.yaml").read_text())
    exp["name"] = "dp-second-run"
    exp["federation"]["rounds"] = 1
    config = tmp / "dp-second.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp / "run-2"
    res = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=dp_run["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return {"out": out, "ledger": json.loads((out / "privacy.json").read_text())}


@pytest.mark.slow
def test_a_second_run_continues_the_lifetime_epsilon(dp_run: dict, second_run: dict, small_consortium: Path
                                                     ) -> None:
    """The lifetime budget belongs to the site, not to the coordinator's run name: a new run's epsilon starts at
    zero but the site's lifetime epsilon continues (at the site: the replies carry the run's epsilon only), and
    site-c, whose lifetime budget run 1 used up, refuses."""
    (entry,) = second_run["ledger"]["rounds"]
    for site in ("site-a", "site-b"):
        rec = entry["sites"][site]
        assert rec["status"] == "trained" and "lifetime_epsilon" not in rec
        assert close(rec["epsilon"], dp_sgd_epsilon(rec["sample_rate"], PATIENT_Z, rec["steps_round"], DELTA))
    refused = entry["sites"]["site-c"]
    assert refused["status"] == "refused", refused
    assert "lifetime max-patient-epsilon" in refused["reason"] and "run 'dp-second-run-" in refused["reason"]
    # The site operator's view of the same ledger: three rounds in all at site-a and site-b (two of run 1, one of
    # run 2), composed at the site's delta.
    from fl_client.cmd_privacy import summarize

    for site, runs in (("site-a", {"dp-ledger-test": 2, "dp-second-run": 1}), ("site-c", {"dp-ledger-test": 1})):
        summary = summarize(SiteSettings(data_path=small_consortium / site, name=None, cache_dir=None, device="cpu",
                                         max_patient_epsilon=None, privacy_state_dir=dp_run["privacy_dir"]))
        names = ("dp-ledger-test", "dp-second-run")
        got = {next(n for n in names if is_run(r["run_id"], n)): r["dp_rounds"] for r in summary["runs"]
               if r["dp_rounds"]}
        assert got == runs
        # Every run is listed, the refused one too (the site evaluated in it).
        assert {next(n for n in names if is_run(r["run_id"], n)) for r in summary["runs"]} == set(names)
        assert summary["delta"] == DELTA and summary["unit"] == "patient"
        rec = entry["sites"][site] if site != "site-c" else dp_run["ledger"]["rounds"][0]["sites"][site]
        steps = rec["steps_round"] * sum(runs.values())
        assert close(summary["lifetime_epsilon"], dp_sgd_epsilon(rec["sample_rate"], PATIENT_Z, steps, DELTA))
        if site == "site-c":
            assert summary["max_patient_epsilon"] == dp_run["budget"]
            assert summary["remaining_epsilon"] == pytest.approx(dp_run["budget"] - dp_run["one_round"], abs=1e-4)
            assert is_run(summary["refusals"][-1]["run_id"], "dp-second-run")
    text = subprocess.run([str(BIN / "llnm-site"), "privacy", "--data", str(small_consortium / "site-c"),
                           "--privacy-state-dir", str(dp_run["privacy_dir"])], capture_output=True, text=True,
                          timeout=120).stdout
    assert "Training patients: lifetime epsilon" in text and "Refused: run dp-second-run-" in text


@pytest.mark.slow
def test_resumed_run_continues_the_ledger(dp_run: dict, tmp_path: Path) -> None:
    """A crash after round 2's ledger entry but before its checkpoint: resume re-runs round 2. The sites
    replay their identical releases (no double counting), round 1 is kept (no reset), and the abandoned
    round's site-level release stays counted."""
    out = tmp_path / "run"
    shutil.copytree(dp_run["out"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["rounds"] = metrics["rounds"][:1]
    (out / "metrics.json").write_text(json.dumps(metrics))
    for f in ("round-0002.safetensors", "round-0002.json", "server-state-0002.json"):
        (out / "checkpoints" / f).unlink(missing_ok=True)
    info = json.loads((out / "run.json").read_text())
    info.update(status="stopped", rounds_completed=1)
    (out / "run.json").write_text(json.dumps(info))

    res = subprocess.run([str(BIN / "llnm-server"), "resume", str(out)], capture_output=True, text=True,
                         timeout=900, cwd=ROOT, env=dp_run["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    before, after = dp_run["ledger"], json.loads((out / "privacy.json").read_text())
    assert [e["round"] for e in after["rounds"]] == [1, 2]
    assert after["rounds"][0] == before["rounds"][0]
    assert [e["round"] for e in after["abandoned"]] == [2]
    for site in ("site-a", "site-b"):
        old, new = before["rounds"][1]["sites"][site], after["rounds"][1]["sites"][site]
        assert new["replayed"] and new["attempts_round"] == 1
        assert new["steps_total"] == old["steps_total"] and new["epsilon"] == old["epsilon"]
    assert after["rounds"][1]["sites"]["site-c"]["status"] == "refused"
    check_patient_epsilons(after)
    server = after["rounds"][1]["server"]
    assert server["releases"] == 3
    assert close(server["epsilon"], gaussian_epsilon(SITE_Z, 3, DELTA))


@pytest.mark.parametrize(
    ("clipping", "flower_class", "accounted"),
    [("server-fixed", "DifferentialPrivacyServerSideFixedClipping", True),
     ("client-fixed", "DifferentialPrivacyClientSideFixedClipping", True),
     ("server-adaptive", "DifferentialPrivacyServerSideAdaptiveClipping", False),
     ("client-adaptive", "DifferentialPrivacyClientSideAdaptiveClipping", False)],
)
def test_site_dp_modes_use_flowers_wrappers(clipping: str, flower_class: str, accounted: bool) -> None:
    from flwr.serverapp.strategy import FedAvg

    from fl_server.config import parse_config
    from fl_server.privacy import flower_wrapper_name, wrap_with_site_dp

    exp = parse_config({"privacy": {"site": {"enabled": True, "clipping": clipping, "noise_multiplier": 0.3,
                                             "clipping_norm": 0.5}}})
    strategy = wrap_with_site_dp(FedAvg(weighted_by_key="unit-weight"), exp, 7)
    assert flower_wrapper_name(strategy) == flower_class
    assert (getattr(strategy, "accountant", None) is not None) == accounted


def test_site_dp_configuration_errors_name_the_key() -> None:
    from flwr.serverapp.strategy import FedAvg

    from fl_server.config import ConfigError, parse_config
    from fl_server.privacy import wrap_with_site_dp

    # Flower's default clipped_count_stddev (7/20) is too small for noise 1.0 with adaptive clipping.
    exp = parse_config({"privacy": {"site": {"enabled": True, "clipping": "server-adaptive",
                                             "noise_multiplier": 1.0}}})
    with pytest.raises(ConfigError, match=r"privacy\.site\.clipped_count_stddev"):
        wrap_with_site_dp(FedAvg(weighted_by_key="unit-weight"), exp, 7)
    with pytest.raises(ConfigError, match=r"federation\.strategy"):
        parse_config({"federation": {"strategy": "fedadam"},
                      "privacy": {"site": {"enabled": True, "clipping": "server-fixed"}}})
    with pytest.raises(ConfigError, match="no accountant for adaptive clipping"):
        parse_config({"privacy": {"site": {"enabled": True, "clipping": "client-adaptive", "max_epsilon": 3}}})


# ---- two trainings of one site at once -------------------------------------------------------------------
CONCURRENT_SCRIPT = """
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import test_privacy as t
from shared_model.model.modeling import LLNMNet
from shared_model.model.training import trainable_state
tmp, me = Path({tmp!r}), sys.argv[1]
data = t.patient_tensors(16)
torch.manual_seed(int(me))  # each process its own global model: two distinct releases of round 1
state = trainable_state(LLNMNet(t.TINY))
(tmp / f"ready-{{me}}").touch()
while len(list(tmp.glob("ready-*"))) < 2:  # start both sessions together
    time.sleep(0.01)
metrics, _ = t.train_round(t.settings_for(tmp), data, state, 1, pcfg=t.privacy_cfg(), run="race")
print(json.dumps(metrics))
"""


def test_concurrent_trainings_of_one_site_both_count(tmp_path: Path) -> None:
    """Two processes train round 1 of the same site at the same time: the history lock makes the second wait
    and re-read the history, so the file keeps both releases and the epsilon composes both."""
    settings_for(tmp_path)  # creates the site folder once, before the processes race
    script = CONCURRENT_SCRIPT.format(root=str(ROOT), tests=str(Path(__file__).parent), tmp=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for i in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    metrics = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda m: m["dp-epsilon"])
    q, steps = opacus_sampling(16, 8)
    both = dp_sgd_epsilon(q, 1.2, 2 * steps, DELTA)
    assert [m["dp-steps-total"] for m in metrics] == [steps, 2 * steps]
    assert [m["dp-attempts-round"] for m in metrics] == [1, 2]
    attempts = run_releases(json.loads(ledger_file(tmp_path, 16).read_text()), "race", 1)
    assert len(attempts) == 2 and sum(a["steps"] for a in attempts) == 2 * steps
    assert attempts[0]["fingerprint"] != attempts[1]["fingerprint"]
    assert attempts[-1]["epsilon_run_after"] == metrics[-1]["dp-epsilon"]
    assert metrics[-1]["dp-epsilon"] == epsilon_for([(1.2, q, 2 * steps)], DELTA, "rdp")
    assert close(metrics[-1]["dp-epsilon"], both)


def test_history_lock_released_on_every_exit(tmp_path: Path) -> None:
    """A session holds the history lock (a second one times out with a clear error) and releases it when
    training raises, so the next training of the site opens without waiting."""
    settings = settings_for(tmp_path)
    data = patient_tensors(8)
    kw = dict(site_name="a", run_id="lock", settings=settings, privacy_cfg=privacy_cfg(),
              train_patient_ids=ids(len(data)), batch_size=4, local_epochs=1, total_rounds=2, server_round=1)
    from fl_client.privacy.history import lock_path

    session = PatientDPSession.open(**kw)
    path = lock_path(tmp_path / "privacy-state", "a")
    assert path.is_file() and not any(settings.data_path.iterdir())  # beside the history, one per site
    with pytest.raises(PrivacyStateError, match="another training or evaluation of site 'a' holds") as err:
        PatientDPSession.open(**kw, lock_timeout=0.2)
    assert str(path) in str(err.value)
    # The lock is the site's, not the ledger's: a training on other patients of the site waits for it too.
    with pytest.raises(PrivacyStateError, match="holds its privacy records"):
        PatientDPSession.open(**{**kw, "train_patient_ids": ids(9)}, lock_timeout=0.2)
    cfg = TrainConfig(batch_size=4, local_epochs=1, seed=1, device="cpu", lr=1e-3)
    with pytest.raises(RuntimeError, match="DP-SGD was opened for 8"), session:
        # Training fails inside (the loader does not match the plan): the session releases its lock.
        train_local(LLNMNet(TINY), patient_tensors(5), cfg, hooks=session.hooks())
    PatientDPSession.open(**kw, lock_timeout=0).close()
    # A refusal releases it too.
    with pytest.raises(PatientBudgetExceeded):
        PatientDPSession.open(**{**kw, "settings": settings_for(tmp_path, budget=1e-6)})
    PatientDPSession.open(**kw, lock_timeout=0).close()


def test_lifetime_ledger_composes_runs_changed_patients_and_old_files(tmp_path: Path) -> None:
    """One ledger per (site, training patients); a site whose patients changed composes every other ledger of the
    site, whatever patients it shares, and a version-1 per-run file of the site, into its lifetime epsilon;
    `llnm-site privacy` reports the same. No train reply carries that lifetime figure."""
    from fl_client.cmd_privacy import summarize

    settings = settings_for(tmp_path)
    torch.manual_seed(2)
    state = trainable_state(LLNMNet(TINY))
    m1, _ = train_round(settings, patient_tensors(12), state, 1, pcfg=privacy_cfg(), rounds=1, run="first")
    # A version-1 file (one run) of the same site, from before the lifetime ledger.
    legacy = {"format": "llnm-fl patient DP-SGD accountant history", "version": 1, "site": "a", "run_id": "old",
              "accountant": "rdp", "delta": DELTA, "secret": "0" * 64,
              "rounds": {"1": {"attempts": [{"history": [[1.2, 0.5, 4]], "steps": 4}]}}}
    from fl_client.privacy.history import _slug

    (tmp_path / "privacy-state" / f"{_slug('a')}__old.json").write_text(json.dumps(legacy))
    # Two more patients: a new ledger, sharing 12 patients with the first.
    m2, _ = train_round(settings, patient_tensors(14), state, 1, pcfg=privacy_cfg(), rounds=1, run="second")
    q1, s1 = opacus_sampling(12, 8)
    q2, s2 = opacus_sampling(14, 8)
    assert close(m2["dp-epsilon"], dp_sgd_epsilon(q2, 1.2, s2, DELTA))  # this run only
    assert not [k for k in (*m1, *m2) if "lifetime" in k or "budget" in k]
    expected = epsilon_for([(1.2, q1, s1), (1.2, 0.5, 4), (1.2, q2, s2)], DELTA, "rdp")
    assert len(list((tmp_path / "privacy-state").glob("a-*__data-*.json"))) == 2
    summary = summarize(SiteSettings(data_path=settings.data_path, name="a", cache_dir=None, device="cpu",
                                     max_patient_epsilon=None, privacy_state_dir=tmp_path / "privacy-state"),
                        budget=10.0)
    assert summary["lifetime_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert {r["run_id"] for r in summary["runs"]} == {"first", "old", "second"}
    assert summary["remaining_epsilon"] == pytest.approx(10.0 - expected)


def test_lifetime_composition_does_not_depend_on_one_patient(tmp_path: Path) -> None:
    """The audit's one-patient bit: an old ledger of 12 patients, and a new set of 12 other patients with or
    without one returning patient. Whether the returning patient is there changes neither what the reply says
    nor the site's lifetime composition, nor whether it refuses: every ledger of the site is composed."""
    torch.manual_seed(4)
    state = trainable_state(LLNMNet(TINY))
    outcomes = []
    for returning in (False, True):
        tmp = tmp_path / f"returning-{returning}"
        tmp.mkdir()
        settings = settings_for(tmp)
        train_round(settings, patient_tensors(12), state, 1, pcfg=privacy_cfg(), rounds=1, run="old-run")
        new_ids = [f"Q{i:04d}" for i in range(12)] + (["P0003"] if returning else [])
        session = PatientDPSession.open(site_name="a", run_id="new-run", settings=settings,
                                        privacy_cfg=privacy_cfg(),
                                        train_patient_ids=new_ids, batch_size=8, local_epochs=1, total_rounds=1,
                                        server_round=1)
        lifetime_before = session.spent()
        session.close()
        outcomes.append(lifetime_before)
    # Without the returning patient the old run is composed all the same.
    assert outcomes[0] == outcomes[1] > 0


def test_a_replay_that_does_not_reproduce_its_release_is_withheld(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry with the fingerprint of an accounted release reuses its noise; if the result differs (the
    computation is not deterministic, or an input the fingerprint misses changed), it is withheld: not sent,
    not charged, recorded."""
    import fl_client.privacy.session as session_mod
    from fl_client.privacy import ReleaseWithheld

    settings = settings_for(tmp_path)
    data = patient_tensors(16)
    torch.manual_seed(0)
    state = trainable_state(LLNMNet(TINY))
    train_round(settings, data, state, 1, pcfg=privacy_cfg())
    monkeypatch.setattr(session_mod, "state_digest", lambda model: "0" * 64)
    with pytest.raises(ReleaseWithheld, match=r"withholds round 1 .* reused that release's noise"):
        train_round(settings, data, state, 1, pcfg=privacy_cfg())
    ledger = json.loads(ledger_file(tmp_path, 16).read_text())
    assert len(run_releases(ledger, "unit-run", 1)) == 1 and ledger["withheld"][0]["attempt"] == 0


def test_the_fingerprint_covers_the_trainable_mask_and_the_round_config(tmp_path: Path) -> None:
    """The same round retried with another `privacy.patient.trainable` (or any other round-config value) is not a
    replay: a new attempt with fresh seeds."""
    from shared_model.model.architectures import restrict_trainable

    settings = settings_for(tmp_path)
    data = patient_tensors(16)
    torch.manual_seed(0)
    state = trainable_state(LLNMNet(TINY))

    def attempt(trainable: str, config: dict) -> dict:
        model = LLNMNet(TINY)
        model.load_state_dict(state)
        restrict_trainable(model, trainable)  # type: ignore[arg-type]
        session = PatientDPSession.open(site_name="a", run_id="mask", settings=settings, privacy_cfg=privacy_cfg(),
                                        train_patient_ids=ids(16), batch_size=8, local_epochs=1, total_rounds=3,
                                        server_round=1, round_config=config)
        cfg = TrainConfig(batch_size=8, local_epochs=1, seed=5, device="cpu", lr=1e-3)
        return session.finish(train_local(model, data, cfg, global_state=state, hooks=session.hooks()))

    base = {"run-id": "mask", "server-round": 1, "proximal-mu": 0.0}
    assert attempt("all", base)["dp-attempts-round"] == 1
    assert attempt("all", base)["dp-replayed"] == 1  # identical: a replay
    heads = attempt("heads", base)
    assert heads["dp-replayed"] == 0 and heads["dp-attempts-round"] == 2
    changed = attempt("all", {**base, "proximal-mu": 0.01})
    assert changed["dp-replayed"] == 0 and changed["dp-attempts-round"] == 3


def test_site_privacy_never_reads_a_missing_record_as_epsilon_zero(tmp_path: Path) -> None:
    """`llnm-site privacy`: a privacy folder that does not exist is an error, one with no record of the site a loud
    warning (neither says epsilon 0); runs without DP are listed with the patients they left unprotected; and
    --state-dir finds the records where join put them."""
    from fl_client.privacy.site_record import note_exact_evaluation, note_unprotected_round

    site = tmp_path / "site-a"
    site.mkdir()

    def privacy(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "llnm-site"), "privacy", "--data", str(site), *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    typo = privacy("--privacy-state-dir", tmp_path / "nonexistent" / "typo")
    assert typo.returncode == 2 and "does not exist" in typo.stderr and "NOT zero" in typo.stderr
    assert "epsilon 0" not in typo.stdout
    state = tmp_path / "state"
    (state / "privacy").mkdir(parents=True)
    empty = privacy("--state-dir", state)
    assert empty.returncode == 1 and "holds no record of site 'site-a'" in empty.stderr

    settings = SiteSettings(data_path=site, name=None, cache_dir=None, device="cpu", max_patient_epsilon=None,
                            privacy_state_dir=state / "privacy")
    for rnd in (1, 2):
        note_unprotected_round(settings, "site-a", "plain-run", rnd, 120, "d" * 16)
    note_exact_evaluation(settings, "site-a", "plain-run", 2, "val", 30)
    listed = privacy("--state-dir", state)
    assert listed.returncode == 0, listed.stderr
    assert "run plain-run trained without DP in 2 round(s) (1-2): its 120 training patients are NOT protected" \
        in listed.stdout
    assert "run plain-run evaluated val exactly in 1 repl(ies) (round(s) 2): its 30 val patients are NOT" \
        in listed.stdout
    summary = json.loads(privacy("--state-dir", state, "--json").stdout)
    (run,) = summary["runs"]
    assert run["unprotected_rounds"] == [1, 2] and run["epsilon"] is None


def test_a_calibrated_noise_below_the_sites_floor_is_refused(tmp_path: Path) -> None:
    """min-noise-multiplier holds for a noise the site calibrates from the coordinator's target, too."""
    from fl_client.policy import SitePolicyRefusal

    settings = settings_for(tmp_path)
    settings.min_noise_multiplier = 5.0
    kw = dict(site_name="a", run_id="floor", settings=settings, train_patient_ids=ids(16), batch_size=8,
              local_epochs=1, total_rounds=2, server_round=1)
    with pytest.raises(SitePolicyRefusal, match=r"min-noise-multiplier=5 .* calibrated for the run's target_epsilon 3"):
        PatientDPSession.open(**kw, privacy_cfg=privacy_cfg(noise_multiplier=None, target_epsilon=3.0))
    PatientDPSession.open(**kw, privacy_cfg=privacy_cfg(noise_multiplier=None, target_epsilon=0.5)).close()  # z 8.3
