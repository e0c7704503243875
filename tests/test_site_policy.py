"""A site's own policy (node config `require-patient-dp`, `eval-splits`, `patient-delta`, `max-clipping-norm`,
`public-patient-count`, `max-histogram-bins`), enforced by the site.

Fast: the node-config parsing, `llnm-site join --print-command` carrying the flags, the refusal texts.
Slow (`policy_run`): one Flower simulation of three sites without patient DP, where site-a requires patient DP
(its training is refused every round) and site-b evaluates on `test` only (the per-round `val` evaluation is
refused); with `min_sites: 2` the run goes on with the others.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from processes import demo_experiment

from fl_client.policy import SitePolicyRefusal
from fl_client.policy import check_eval_policy as _check_eval_policy
from fl_client.policy import check_train_policy as _check_train_policy
from fl_client.settings import SiteSettings, SiteSettingsError, declared_patient_count
from shared_model.config import PatientDPConfig

DP_ON = PatientDPConfig(enabled=True, noise_multiplier=1.0)
DP_OFF = PatientDPConfig()

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def settings_for(tmp_path: Path, **node_config: object) -> SiteSettings:
    return SiteSettings.from_context(SimpleNamespace(node_config={"data-path": str(tmp_path), **node_config}),
                                     None)


# ---- node config -----------------------------------------------------------------------------------
def test_policy_defaults_and_values(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    assert s.require_patient_dp is False and s.eval_splits == ("val", "test")
    s = settings_for(tmp_path, **{"require-patient-dp": True, "eval-splits": " test "})
    assert s.require_patient_dp is True and s.eval_splits == ("test",)
    assert settings_for(tmp_path, **{"require-patient-dp": "false"}).require_patient_dp is False
    s = settings_for(tmp_path)
    assert (s.patient_delta, s.max_clipping_norm, s.public_patient_count, s.max_histogram_bins) == (1e-5, None,
                                                                                                     None, 100)
    s = settings_for(tmp_path, **{"patient-delta": 1e-6, "max-clipping-norm": 2.0, "public-patient-count": 3000,
                                  "max-histogram-bins": 20, "max-patient-epsilon": 4})
    assert (s.patient_delta, s.max_clipping_norm, s.public_patient_count, s.max_histogram_bins,
            s.max_patient_epsilon) == (1e-6, 2.0, 3000, 20, 4.0)
    assert s.policy()["max-histogram-bins"] == 20 and s.policy()["eval-splits"] == "val,test"


def test_a_dp_floor_implies_require_patient_dp(tmp_path: Path) -> None:
    """A site that sets a budget, a run cap or a noise floor means DP to be on: a round without it would spend
    no epsilon the floor bounds and send the exact loss, steps and count."""
    for key, value in (("max-patient-epsilon", 6), ("max-run-epsilon", 3), ("min-noise-multiplier", 0.7)):
        s = settings_for(tmp_path, **{key: value})
        assert s.require_patient_dp is True, key
        with pytest.raises(SitePolicyRefusal, match="require-patient-dp=true needs patient-level DP"):
            _check_train_policy(s, "site-a", 1, DP_OFF)
    defaults = settings_for(tmp_path)
    assert (defaults.eval_epsilon, defaults.max_eval_epsilon, defaults.exact_evaluation, defaults.min_cell_count,
            defaults.require_secure_aggregation) == (1.0, 10.0, False, 5, False)


def test_public_patient_count_from_node_config_else_site_yaml(tmp_path: Path) -> None:
    assert declared_patient_count(settings_for(tmp_path)) == (None, "not declared")
    (tmp_path / "site.yaml").write_text("name: site-x\npublic_patient_count: 2100\n")
    count, where = declared_patient_count(settings_for(tmp_path))
    assert count == 2100 and "site.yaml field public_patient_count" in where
    assert declared_patient_count(settings_for(tmp_path, **{"public-patient-count": 900}))[0] == 900
    (tmp_path / "site.yaml").write_text("public_patient_count: many\n")
    with pytest.raises(SiteSettingsError, match="public_patient_count='many': expected a positive integer"):
        declared_patient_count(settings_for(tmp_path))


@pytest.mark.parametrize(("node_config", "expected"), [
    ({"eval-splits": "val,train"}, r"eval-splits='val,train': 'train' is never allowed"),
    ({"eval-splits": "train"}, r"eval-splits='train': 'train' is never allowed"),
    ({"eval-splits": "val,holdout"}, r"eval-splits='val,holdout': unknown split 'holdout'"),
    ({"eval-splits": " , "}, r"eval-splits=' , ': names no split"),
    ({"eval-splits": 3}, r"eval-splits=3: expected a comma-separated string"),
    ({"require-patient-dp": "yes please"}, r"require-patient-dp='yes please': expected true or false"),
    ({"require-patient-dp": 1}, r"require-patient-dp=1: expected true or false"),
    ({"patient-delta": 1.5}, r"patient-delta=1\.5: expected a number in \(0, 1\)"),
    ({"max-clipping-norm": -1.0}, r"max-clipping-norm=-1\.0: expected a positive number"),
    ({"public-patient-count": 2.5}, r"public-patient-count=2\.5: expected a positive integer"),
    ({"max-histogram-bins": 15}, r"max-histogram-bins=15: expected an even integer >= 2"),
    ({"max-patient-epsilon": "lots"}, r"max-patient-epsilon='lots': expected a positive number"),
    ({"max-run-epsilon": -2}, r"max-run-epsilon=-2: expected a positive number"),
    ({"min-noise-multiplier": "none"}, r"min-noise-multiplier='none': expected a positive number"),
    ({"eval-epsilon": 0.0}, r"eval-epsilon=0\.0: expected a positive number"),
    ({"max-eval-epsilon": "inf"}, r"max-eval-epsilon='inf': expected a positive number"),
    ({"min-cell-count": 2.5}, r"min-cell-count=2\.5: expected a positive integer"),
    ({"exact-evaluation": "sometimes"}, r"exact-evaluation='sometimes': expected true or false"),
    ({"require-secure-aggregation": 0}, r"require-secure-aggregation=0: expected true or false"),
    # A DP floor implies require-patient-dp: an explicit false beside it is a contradiction, named.
    ({"max-patient-epsilon": 6, "require-patient-dp": False},
     r"max-patient-epsilon bound\(s\) patient-level DP-SGD, but node config require-patient-dp is false"),
    ({"min-noise-multiplier": 0.8, "max-run-epsilon": 3, "require-patient-dp": "false"},
     r"max-run-epsilon, node config min-noise-multiplier bound"),
])
def test_bad_policy_names_the_key_and_value(tmp_path: Path, node_config: dict, expected: str) -> None:
    with pytest.raises(SiteSettingsError, match=expected):
        settings_for(tmp_path, **node_config)


def test_join_print_command_carries_the_policy(tmp_path: Path) -> None:
    def node_config(*flags: str) -> dict:
        done = subprocess.run([str(BIN / "llnm-site"), "join", "--superlink", "127.0.0.1:9092", "--data",
                               str(tmp_path), "--insecure", "--print-command", *flags],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # The printed line pastes into a shell: `env` with the variables the SuperNode needs, then the quoted
        # command, whose node config is one argument of TOML key=value pairs.
        words = shlex.split(done.stdout.strip().splitlines()[-1])
        assert words[0] == "env"
        assignments = dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("-"))
        assert {"LLNM_SITE_STATE_DIR", "LLNM_SITE_NAME", "PATH"} <= set(assignments)
        node = words[words.index("--node-config") + 1]
        pairs = re.findall(r'([\w-]+=(?:"(?:[^"\\]|\\.)*"|\S+))', node)
        return tomllib.loads("\n".join(pairs))

    got = node_config("--require-patient-dp", "--eval-splits", "test")
    assert got["require-patient-dp"] is True and got["eval-splits"] == "test"
    assert got["data-path"] == str(tmp_path.resolve())
    got = node_config()
    assert got["require-patient-dp"] is False and got["eval-splits"] == "val,test"
    assert got["share-explanations"] is True and node_config("--no-share-explanations")["share-explanations"] is False
    bad = subprocess.run([str(BIN / "llnm-site"), "join", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path),
                          "--print-command", "--eval-splits", "val,train"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--eval-splits" in bad.stderr and "'train' is never allowed" in bad.stderr


def test_refusals_name_the_site_the_rule_and_the_value(tmp_path: Path) -> None:
    strict = settings_for(tmp_path, **{"require-patient-dp": True, "eval-splits": "test"})
    _check_train_policy(strict, "site-a", 1, DP_ON)
    with pytest.raises(SitePolicyRefusal) as exc:
        _check_train_policy(strict, "site-a", 2, DP_OFF)
    text = str(exc.value)
    assert text.startswith("site policy: site 'site-a' refuses round 2 training")
    assert "require-patient-dp=true" in text and "privacy-config enabled=false" in text
    assert "privacy.patient" in text and "--require-patient-dp" in text
    _check_eval_policy(strict, "site-a", 1, "test")
    with pytest.raises(SitePolicyRefusal, match=r"site 'site-a' refuses round 1 evaluation: its rule "
                                                 r"eval-splits=test .* eval-split=val"):
        _check_eval_policy(strict, "site-a", 1, "val")
    lax = settings_for(tmp_path)
    _check_train_policy(lax, "site-c", 1, DP_OFF)
    with pytest.raises(SitePolicyRefusal, match="eval-split=train"):
        _check_eval_policy(lax, "site-c", 1, "train")
    # The site's limits on the coordinator's DP parameters.
    limits = settings_for(tmp_path, **{"patient-delta": 1e-6, "max-clipping-norm": 1.0})
    _check_train_policy(limits, "site-d", 1, DP_ON.model_copy(update={"delta": 1e-6}))
    with pytest.raises(SitePolicyRefusal, match=r"site 'site-d' refuses round 3 training: its rule "
                                                 r"patient-delta=1e-06 .* delta=1e-05"):
        _check_train_policy(limits, "site-d", 3, DP_ON)
    with pytest.raises(SitePolicyRefusal, match=r"max-clipping-norm=1 .* max_grad_norm=2\. The coordinator"):
        _check_train_policy(limits, "site-d", 3, DP_ON.model_copy(update={"delta": 1e-7, "max_grad_norm": 2.0}))
    # The floor under the coordinator's DP settings, and secure aggregation.
    floor = settings_for(tmp_path, **{"max-run-epsilon": 3, "min-noise-multiplier": 0.8,
                                      "require-secure-aggregation": True})
    targeted = PatientDPConfig(enabled=True, target_epsilon=3.0)
    with pytest.raises(SitePolicyRefusal, match="require-secure-aggregation=true trains only inside"):
        _check_train_policy(floor, "site-e", 1, targeted)
    _check_train_policy(floor, "site-e", 1, targeted, secure_round=True)
    with pytest.raises(SitePolicyRefusal, match=r"max-run-epsilon=3 .* target_epsilon=500"):
        _check_train_policy(floor, "site-e", 2, targeted.model_copy(update={"target_epsilon": 500.0}),
                            secure_round=True)
    with pytest.raises(SitePolicyRefusal, match=r"min-noise-multiplier=0\.8 .* noise_multiplier is 0\.02"):
        _check_train_policy(floor, "site-e", 2, PatientDPConfig(enabled=True, noise_multiplier=0.02),
                            secure_round=True)


# ---- a federated run with two sites' policies (Flower simulation) --------------------------------------
POLICY_SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory: pytest.TempPathFactory, small_consortium: Path) -> dict:
    tmp = tmp_path_factory.mktemp("policy-run")
    exp = demo_experiment()
    exp["evaluation"] = {"explain": False}
    exp["name"] = "site-policy-test"
    exp["data"] = {"root": str(small_consortium), "sites": POLICY_SITES}
    exp["federation"].update({"rounds": 1, "min_sites": 2, "eval_bootstrap": 0, "eval_split": "val",
                              "final_eval_split": "test", "round_timeout_s": 600})
    exp["simulation"].update({"cpus_per_site": 1, "site_node_config": {"site-a": {"require-patient-dp": True},
                                                                       "site-b": {"eval-splits": "test"},
                                                                       "site-c": {"max-histogram-bins": 20}}})
    exp.pop("privacy", None)
    config = tmp / "policy.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp / "run"
    res = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return {"out": out, "stdout": res.stdout, "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.mark.slow
def test_a_site_requiring_patient_dp_refuses_and_the_run_goes_on(policy_run: dict) -> None:
    metrics, out = policy_run["metrics"], policy_run["out"]
    (round1,) = metrics["rounds"]
    assert round1["participants"] == ["site-b", "site-c"] and set(round1["train"]) == {"site-b", "site-c"}
    failure = next(f for f in round1["failures"] if f["site"] == "site-a")
    assert failure["phase"] == "train"
    # Recorded in the site's own words, not Flower's wrapping of them.
    assert failure["reason"].startswith("site policy: site 'site-a' refuses round 1 training"), failure["reason"]
    for text in ("require-patient-dp=true", "privacy-config enabled=false", "privacy.patient"):
        assert text in failure["reason"], failure["reason"]
    assert "site-a train: site policy: site 'site-a' refuses round 1 training" in (out / "log.txt").read_text()
    assert "site-a train: site policy:" in policy_run["stdout"]
    # Without patient DP the exact training values are still sent.
    assert all("train-loss" in m for m in round1["train"].values())
    st = subprocess.run([str(BIN / "llnm-server"), "status", str(out), "--json"], capture_output=True, text=True)
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "completed", st.stderr
    # Status and the model card say, from the same records, who trained and who refused, and why.
    st = subprocess.run([str(BIN / "llnm-server"), "status", str(out)], capture_output=True, text=True)
    assert "site site-a: trained in no round, refused round(s) 1 (site policy: site 'site-a'" in st.stdout, st.stdout
    assert "site site-b: trained in round(s) 1" in st.stdout and "None" not in st.stdout
    from fl_server.model_card import render_model_card
    from fl_server.report import build_report

    card = render_model_card("site-policy-test", build_report(out)["model_card"])
    assert "over 2 site(s) that trained (site-b, site-c)" in card and "site-a: trained in no round" in card
    assert "True" not in card and "None" not in card.split("## Hashes")[0]


@pytest.mark.slow
def test_a_site_refuses_a_split_outside_its_eval_splits(policy_run: dict) -> None:
    metrics = policy_run["metrics"]
    (round1,) = metrics["rounds"]
    # site-a only refuses training: it still evaluates; site-b refuses the val evaluation.
    assert set(round1["sites"]) == {"site-a", "site-c"}
    failure = next(f for f in round1["failures"] if f["site"] == "site-b")
    assert failure["phase"] == "evaluate"
    assert failure["reason"].startswith("site policy: site 'site-b' refuses round 1 evaluation"), failure["reason"]
    assert "eval-splits=test" in failure["reason"] and "eval-split=val" in failure["reason"]
    # The final evaluation is on test, which every site allows.
    assert set(metrics["final"]["sites"]) == set(POLICY_SITES) and metrics["final"]["failures"] == []


@pytest.mark.slow
def test_score_histograms_are_capped_by_each_sites_policy(policy_run: dict) -> None:
    """Evaluate replies carry at most max-histogram-bins bins (default 100); site-c caps at 20, so the pooled
    metrics are merged on 20 bins and say how far the binned AUC can be from the exact one."""
    final = policy_run["metrics"]["final"]
    pooled = final["pooled"]
    assert pooled["n_bins"] == 20 and pooled["auc_max_abs_error"] is not None
    (round1,) = policy_run["metrics"]["rounds"]
    assert round1["pooled"]["n_bins"] == 20  # site-a (100 bins) and site-c (20 bins) evaluated val


def test_join_picks_a_free_local_port_or_names_the_taken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several SuperNodes on one machine each need their own local Runtime API port: join takes Flower's 9094
    when it is free, another free one when it is not (and says so), and refuses a taken --clientappio-port."""
    import argparse
    import socket

    from fl_client import join_plan

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(join_plan.PortTaken, match=f"--clientappio-port {busy} is taken"):
            join_plan.local_port(argparse.Namespace(clientappio_port=busy))
        monkeypatch.setattr(join_plan, "DEFAULT_LOCAL_PORT", busy)
        args = argparse.Namespace(clientappio_port=None)
        chosen = join_plan.local_port(args)
        assert chosen != busy and join_plan.local_port(args) == chosen  # chosen once per join


def test_node_config_rendering_is_the_inverse_of_reading_it(tmp_path: Path) -> None:
    """settings.py owns the node-config keys: what `to_node_config` writes (and `render_node_config` puts on
    join's command line, as TOML) reads back as the same settings."""
    from fl_client.settings import render_node_config

    original = settings_for(tmp_path, **{"site-name": "site-q", "cache-dir": str(tmp_path / "c"), "threads": 2,
                                         "max-patient-epsilon": 6.0, "max-run-epsilon": 3.0, "eval-splits": "test",
                                         "min-noise-multiplier": 0.5, "exact-evaluation": True, "eval-epsilon": 2.0,
                                         "min-cell-count": 7, "require-secure-aggregation": True,
                                         "public-patient-count": 300, "max-histogram-bins": 20})
    written = original.to_node_config()
    back = SiteSettings.from_context(SimpleNamespace(node_config=written), None)
    assert back == original
    parsed = tomllib.loads("\n".join(re.findall(r'([\w-]+=(?:"(?:[^"\\]|\\.)*"|\S+))',
                                                render_node_config(written))))
    assert SiteSettings.from_context(SimpleNamespace(node_config=parsed), None) == original
