"""Secure aggregation (Flower's SecAgg+ through its legacy workflow): the coordinator's code only ever holds the
sum of the sites' updates, the result is plain FedAvg's to within the quantization, a site dropping out
mid-round is tolerated, and site-level DP works on top (each site clips before masking, the coordinator adds
the noise to the unmasked mean).

`secure_pair` runs the same one-round experiment twice in Flower's simulation engine, plainly and with
secure aggregation, on three sites of which one refuses to train under its own policy after the key
exchange (a real mid-round dropout); a spy records what the coordinator's strategies receive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import ROOT, write_config

from fl_server.config import ConfigError, load_config, parse_config
from shared_model import protocol

SITES = ["site-a", "site-b", "site-c"]
DROPPER = "site-c"  # requires patient-level DP: refuses this non-DP round at the masking stage


@pytest.mark.parametrize(("patch", "expected"), [
    ({"privacy": {"site": {"enabled": True, "clipping": "server-fixed"}}}, "use client-fixed"),
    ({"federation": {"min_sites": 1}}, "at least 2 sites"),
    ({"federation": {"min_sites": 3, "secagg": {"reconstruction_threshold": 4}}}, "could never be unmasked"),
])
def test_secure_aggregation_config_is_checked(patch: dict, expected: str) -> None:
    base: dict = {"federation": {"secure_aggregation": True, "min_sites": 3}}
    for section, values in patch.items():
        for key, value in values.items():
            base.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=expected):
        parse_config(base)


def _fitins_message(global_state: dict, config: dict):
    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 2, 3
    keys = list(global_state)
    cfg = {**config, protocol.SECAGG_KEYS: json.dumps(keys)}
    fitins = FitIns(ndarrays_to_parameters([global_state[k] for k in keys]), cfg)
    return Message(fitins_to_recorddict(fitins, keep_input=True), dst_node_id=2, message_type="train")


def _site_train(local: dict, n: int):
    """A stand-in for the site's train handler: replies with `local` as its model and `n` train patients."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    def call_next(msg, _ctx):
        import torch

        assert set(msg.content[protocol.ARRAYS_RECORD].keys()) == set(local)
        assert not any(k.startswith("secagg-") for k in msg.content[protocol.CONFIG_RECORD])
        return Message(RecordDict({
            protocol.ARRAYS_RECORD: ArrayRecord({k: torch.from_numpy(v) for k, v in local.items()}),
            protocol.METRICS_RECORD: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.UNIT_WEIGHT: 1}),
            protocol.SITE_RECORD: ConfigRecord({protocol.SITE_NAME: "site-a", protocol.SITE_POLICY: "{}"})}),
            reply_to=msg)
    return call_next


def test_a_site_sends_its_scaled_update_never_its_model() -> None:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from fl_client.secure_aggregation import SecureAggregationRefusal, _train_for_fitres

    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    local = {k: v + np.float32(0.01) * rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
    config = {protocol.SECAGG_WEIGHT_KEY: protocol.NUM_EXAMPLES, protocol.SECAGG_WEIGHT_SCALE: 50.0,
              protocol.SECAGG_CLIPPING_RANGE: 8.0, protocol.SERVER_ROUND: 1}
    reply = _train_for_fitres(_fitins_message(g, config), None, _site_train(local, 25))
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    sent = parameters_to_ndarrays(fitres.parameters)
    for u, key in zip(sent, ["w", "b"], strict=True):
        np.testing.assert_allclose(u, (local[key].astype(np.float64) - g[key]) * 25 / 50, rtol=1e-6)
    assert fitres.num_examples == 1
    assert fitres.metrics[protocol.SITE_NAME] == "site-a" and fitres.metrics[protocol.NUM_EXAMPLES] == 25
    far = {k: v + 100 for k, v in g.items()}
    with pytest.raises(SecureAggregationRefusal, match=r"does not fit federation\.secagg\.clipping_range 8") as err:
        _train_for_fitres(_fitins_message(g, config), None, _site_train(far, 25))
    # The coordinator chooses the range that triggers the refusal: the text carries no value of the update.
    peak = max(float(np.max(np.abs((far[k] - g[k]) * 25 / 50))) for k in g)
    assert not any(token in str(err.value) for token in (f"{peak:.3g}", f"{peak:g}", "50"))


def test_a_site_that_requires_secure_aggregation_trains_only_in_secure_rounds() -> None:
    """require-secure-aggregation: a plain train message is refused; the same site trains inside a SecAgg+
    round, which only this module's path can mark (a message cannot)."""
    from fl_client.policy import SitePolicyRefusal, check_train_policy
    from fl_client.secure_aggregation import _train_for_fitres, inside_secure_round
    from fl_client.settings import SiteSettings
    from shared_model.config import PatientDPConfig

    settings = SiteSettings(data_path=Path("."), name="site-a", cache_dir=None, device="cpu",
                            max_patient_epsilon=None, privacy_state_dir=None, require_secure_aggregation=True)
    with pytest.raises(SitePolicyRefusal, match="require-secure-aggregation=true trains only inside"):
        check_train_policy(settings, "site-a", 1, PatientDPConfig(), secure_round=inside_secure_round())
    seen = []
    inner = _site_train({"w": np.zeros((2, 2), np.float32)}, 4)

    def handler(msg, ctx):
        seen.append(inside_secure_round())
        check_train_policy(settings, "site-a", 1, PatientDPConfig(), secure_round=inside_secure_round())
        return inner(msg, ctx)

    config = {protocol.SECAGG_WEIGHT_KEY: protocol.UNIT_WEIGHT, protocol.SECAGG_WEIGHT_SCALE: 1.0,
              protocol.SECAGG_CLIPPING_RANGE: 8.0, protocol.SERVER_ROUND: 1}
    _train_for_fitres(_fitins_message({"w": np.zeros((2, 2), np.float32)}, config), None, handler)
    assert seen == [True] and inside_secure_round() is False


def test_under_site_dp_a_site_clips_before_it_masks() -> None:
    """The SecAgg+ path runs the site's own train chain, Flower's fixedclipping_mod included."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from fl_client.privacy import site_dp_clipping_mod
    from fl_client.secure_aggregation import _train_for_fitres

    rng = np.random.default_rng(1)
    g = {"w": rng.normal(size=(6, 5)).astype(np.float32)}
    local = {"w": g["w"] + np.float32(0.5)}
    config = {protocol.SECAGG_WEIGHT_KEY: protocol.UNIT_WEIGHT, protocol.SECAGG_WEIGHT_SCALE: 1.0,
              protocol.SECAGG_CLIPPING_RANGE: 8.0, protocol.SERVER_ROUND: 1,
              protocol.SITE_DP_CLIPPING: protocol.SITE_DP_CLIENT_FIXED, "clipping_norm": 0.3}
    inner = _site_train(local, 25)
    reply = _train_for_fitres(_fitins_message(g, config), None,
                              lambda m, c: site_dp_clipping_mod(m, c, inner))
    [u] = parameters_to_ndarrays(recorddict_to_fitres(reply.content, keep_input=True).parameters)
    assert np.linalg.norm(u) == pytest.approx(0.3, rel=1e-4)  # clipped from 0.5 * sqrt(30) = 2.7


SPY_DRIVER = """
import hashlib, json, sys
import numpy as np
import fl_server.secure_aggregation as sa
from flwr.common import parameters_to_ndarrays
from flwr.serverapp.strategy import FedAvg
from fl_server.config import load_config
from fl_server.run_dir import RunDirectory
from fl_research.simulation import simulate

seen = {"fitres": [], "strategy": []}

def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

original_fit = sa._OneRound.aggregate_fit
def spy_fit(self, rnd, results, failures):
    seen["fitres"].append(sorted(digest(parameters_to_ndarrays(r.parameters)) for _, r in results))
    return original_fit(self, rnd, results, failures)
sa._OneRound.aggregate_fit = spy_fit

original_train = FedAvg.aggregate_train
def spy_train(self, rnd, replies):
    replies = list(replies)
    seen["strategy"].append(sorted(digest([v.numpy() for v in r.content["arrays"].values()]) for r in replies))
    return original_train(self, rnd, replies)
FedAvg.aggregate_train = spy_train

config, out, data, spy = sys.argv[1:5]
simulate(load_config(config), RunDirectory(out), data_root=data)
open(spy, "w").write(json.dumps(seen))
"""


def _simulate_with_spy(tmp: Path, name: str, consortium: Path, secure: bool) -> dict:
    (tmp / name).mkdir()
    config = write_config(tmp / name, data={"root": str(consortium), "sites": SITES},
                          federation={"rounds": 1, "min_sites": 2, "eval_bootstrap": 0, "final_eval_split": None,
                                      "secure_aggregation": secure, "secagg": {"weight_scale": 20.0}},
                          simulation={"cpus_per_site": 1,
                                      "site_node_config": {DROPPER: {"require-patient-dp": True}}})
    exp = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**exp, "name": name}))
    driver = tmp / "spy_driver.py"
    driver.write_text(SPY_DRIVER)
    out, spy = tmp / name / "run", tmp / name / "spy.json"
    done = subprocess.run([sys.executable, str(driver), str(config), str(out), str(consortium), str(spy)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "spy": json.loads(spy.read_text()), "config": config}


@pytest.fixture(scope="module")
def secure_pair(tmp_path_factory: pytest.TempPathFactory, small_consortium: Path) -> dict:
    tmp = tmp_path_factory.mktemp("secagg")
    return {"plain": _simulate_with_spy(tmp, "plain", small_consortium, False),
            "secure": _simulate_with_spy(tmp, "secure", small_consortium, True)}


@pytest.mark.slow
def test_the_coordinators_strategies_only_ever_hold_the_aggregate(secure_pair: dict) -> None:
    plain, secure = secure_pair["plain"]["spy"], secure_pair["secure"]["spy"]
    # Without secure aggregation the strategy holds each site's own model: two different ones.
    assert len(set(plain["strategy"][0])) == 2
    # With it, Flower's workflow hands our legacy strategy the unmasked mean in place of every site's update,
    # and the Message-API strategy gets that same aggregate model from every site.
    [fitres] = secure["fitres"]
    assert len(fitres) == 2 and len(set(fitres)) == 1
    [replies] = secure["strategy"]
    assert len(replies) == 2 and len(set(replies)) == 1
    entry = json.loads((secure_pair["secure"]["out"] / "metrics.json").read_text())["rounds"][0]
    assert entry["secure_aggregation"]["aggregate_only"] is True


@pytest.mark.slow
def test_secure_result_is_plain_fedavgs_within_the_quantization(secure_pair: dict) -> None:
    from fl_server.run_dir import RunDirectory

    plain_rd, secure_rd = (RunDirectory(secure_pair[k]["out"]) for k in ("plain", "secure"))
    a, b = plain_rd.load_checkpoint(1), secure_rd.load_checkpoint(1)
    metrics = secure_rd.metrics()["rounds"][0]
    exp = load_config(secure_pair["secure"]["config"])
    sa = exp.federation.secagg
    weights = [m[protocol.NUM_EXAMPLES] / sa.weight_scale for m in metrics["train"].values()]
    # Flower quantizes each scaled update with stochastic rounding (error below one step, 2 * clipping_range /
    # quantization_range); the mean is rescaled by K / sum(weights); plus float32 rounding.
    bound = len(weights) / sum(weights) * 2 * sa.clipping_range / sa.quantization_range + 1e-6
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert math.isfinite(diff) and diff <= bound, (diff, bound)
    # ... which is far below what the round changed: the comparison is not vacuous.
    from fl_server.strategies import initial_state

    start = initial_state(exp)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 20 * bound, (moved, bound)


@pytest.mark.slow
def test_a_site_dropping_mid_round_is_tolerated(secure_pair: dict) -> None:
    entry = json.loads((secure_pair["secure"]["out"] / "metrics.json").read_text())["rounds"][0]
    info = entry["secure_aggregation"]
    assert (info["sampled"], info["completed"]) == (3, 2)
    [failure] = [f for f in entry["failures"] if f["phase"] == "train"]
    assert failure["site"] == DROPPER and failure["reason"].startswith("site policy:")
    assert set(entry["participants"]) == set(SITES) - {DROPPER}
    # Its evaluation still happens: per-site metrics keep working.
    assert set(entry["sites"]) == set(SITES)
    assert entry["pooled"]["n"] == sum(m["n"] for m in entry["sites"].values())


def test_site_dp_noise_goes_on_the_unmasked_mean() -> None:
    """Flower's client-side DP wrapper, fed the synthetic replies of a secure round (the same aggregate from every
    site), adds N(0, (z C / K)^2) to that aggregate and accounts one release."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_server.strategies import build_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 3
    exp = parse_config({"federation": {"secure_aggregation": True, "min_sites": 3},
                        "privacy": {"site": {"enabled": True, "clipping": "client-fixed", "noise_multiplier": 2.0,
                                             "clipping_norm": 0.3}}})
    strategy = build_strategy(exp, num_sites_expected=3)
    aggregate = {"w": torch.zeros(200_000)}

    class Nodes:  # all a strategy asks of the Grid when it samples
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

    instructions = strategy.configure_train(1, ArrayRecord(aggregate), ConfigRecord({}), Nodes())
    replies = [Message(RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord(aggregate),
        protocol.METRICS_RECORD: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.UNIT_WEIGHT: 1}),
        protocol.SITE_RECORD: ConfigRecord({protocol.SITE_NAME: f"s{m.metadata.dst_node_id}"})}), reply_to=m)
        for m in instructions]
    noisy, _ = strategy.aggregate_train(1, replies)
    noise = noisy.to_torch_state_dict()["w"].numpy()
    assert float(np.std(noise)) == pytest.approx(2.0 * 0.3 / 3, rel=0.02)
    assert abs(float(np.mean(noise))) < 0.01
