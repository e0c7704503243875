"""The held-out seed protocol of the benchmarks: tuning and evaluation seeds, and headlines from evaluation only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark modules (they live outside the packages and import each other by name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _privacy_heldout
        import _seeds
        import bench_federated
        import bench_fidelity
        import bench_privacy

        yield {"seeds": _seeds, "heldout": _privacy_heldout, "federated": bench_federated, "privacy": bench_privacy,
               "fidelity": bench_fidelity}
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_an_evaluation_seed_a_decision_looked_at_is_refused_naming_the_decision(bench) -> None:
    seeds = bench["seeds"]
    with pytest.raises(ValueError, match=r"\[2501\] were looked at .*issue 27 was filed on"):
        seeds.check_protocol([], [101, 2501, 102])
    with pytest.raises(ValueError, match=r"\[0, 1\] were looked at"):
        seeds.check_protocol([], [0, 1])
    with pytest.raises(ValueError, match=r"\[104\] are both tuning and evaluation"):
        seeds.check_protocol([104], [104, 105])
    with pytest.raises(ValueError, match="at least 3 evaluation seed"):
        seeds.check_protocol([11], [101], minimum=3)
    record = seeds.check_protocol([11, 12], [101, 102, 103], minimum=3)
    assert record["tuning_seeds"] == [11, 12] and record["evaluation_seeds"] == [101, 102, 103]
    assert "11" in record["looked_at"] and "101" not in record["looked_at"]
    assert set(seeds.DEFAULT_TUNING_SEEDS) <= set(seeds.LOOKED_AT)
    assert not set(seeds.DEFAULT_EVALUATION_SEEDS) & set(seeds.LOOKED_AT)


@pytest.mark.parametrize(("text", "message"), [("1,x", "'x' is not"), ("3,3", "seed 3 is listed twice"),
                                               ("-1", "'-1' is not")])
def test_seed_lists_are_parsed_strictly(bench, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--evaluation-seeds: {message}"):
        bench["seeds"].parse_seeds(text, "--evaluation-seeds")
    assert bench["seeds"].parse_seeds(" 5, 6 ,", "--x") == [5, 6]


def _block(ref_auc: float, costs: dict[str, float]) -> dict:
    return {"reference": {"pooled_test_auc": ref_auc}, "designs": {"demo-dp": {
        "no_dp": {"cost": {"mean": 0.005}},
        "epsilons": {eps: {"cost": {"mean": c, "ci95": [c - 0.01, c + 0.01]}} for eps, c in costs.items()}}}}


def test_privacy_headline_is_the_mean_over_evaluation_seeds_only(bench) -> None:
    heldout = bench["heldout"]
    per_seed = {"seed-11": _block(0.9, {"3": 0.001}),  # a tuning seed with a flattering cost
                "seed-101": _block(0.82, {"3": 0.03}), "seed-102": _block(0.84, {"3": 0.01}),
                "seed-103": _block(0.83, {"3": 0.02})}
    head = heldout.headline(per_seed, [101, 102, 103])
    cost = head["designs"]["demo-dp"]["epsilons"]["3"]
    assert cost["mean_cost"] == pytest.approx(0.02) and set(cost["per_seed"]) == {"seed-101", "seed-102", "seed-103"}
    assert head["reference_pooled_test_auc_mean"] == pytest.approx(0.83)
    assert head["target"]["met"] is True and head["target"]["best_mean_cost"] == pytest.approx(0.02)
    per_seed["seed-101"] = _block(0.82, {"3": 0.031})
    assert heldout.headline(per_seed, [101, 102, 103])["target"]["met"] is False
    # fewer than three evaluation seeds never meet the rule, however small the cost
    assert heldout.headline({"seed-101": _block(0.8, {"3": 0.0})}, [101])["target"]["met"] is False


def test_privacy_benchmark_refuses_a_looked_at_evaluation_seed(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench["privacy"].main(["--profile", "heldout", "--evaluation-seeds", "101,0"]) == 2
    assert "evaluation seed(s) [0] were looked at" in capsys.readouterr().err


def test_federated_summary_is_over_evaluation_seeds_and_tuning_seeds_apart(bench) -> None:
    def entry(auc: float) -> dict:
        return {"pooled_test_auc": auc}

    results = {"tuning": {"label": "an older file's"},
               "runs": {"seed-1/pooled": entry(0.80), "seed-1/fedavg": entry(0.70),
                        "seed-101/pooled": entry(0.80), "seed-101/fedavg": entry(0.79),
                        "seed-102/pooled": entry(0.81), "seed-102/fedavg": entry(0.81)},
               "seeds": {"seed-1": {"role": "tuning", "bayes_test_auc": {"pooled": 0.85}},
                         "seed-101": {"role": "evaluation", "bayes_test_auc": {"pooled": 0.86}},
                         "seed-102": {"role": "evaluation", "bayes_test_auc": {"pooled": 0.87}}}}
    bench["federated"].summarise(results)
    assert results["summary"]["gap_pooled_minus_fedavg"] == {"seed-101": 0.01, "seed-102": 0.0}
    assert results["summary"]["mean_gap"] == pytest.approx(0.005) and results["summary"]["goal_met"] is True
    assert results["tuning_seeds_summary"]["gap_pooled_minus_fedavg"] == {"seed-1": 0.1}
    assert results["tuning_seeds_summary"]["label"] == "measured on its tuning data"
    assert "tuning" not in results  # that block labels a whole file as measured on its tuning data
    assert any("evaluation seeds (headline): mean gap +0.005" in line for line in results["table"])


def _fidelity_entry(seed: int, role: str, fraction: float, step_ratio: float, share_gap: float,
                    image_gap: float) -> dict:
    shares = {"location": 0.4, "morphology": 0.3, "report": 0.25, "demographics": 0.05}
    return {"seed": seed, "patients": 2100, "role": role, "image_only": {"gap_to_bound": image_gap},
            "federated": {"fraction_of_bayes": fraction, "pooled_test_auc": 0.85 * fraction, "bayes_test_auc": 0.85,
                          "location_step": {"ratio": step_ratio},
                          "shares": {"max_abs_gap_to_generator": share_gap, "model": shares, "generator": shares}}}


def test_fidelity_headline_is_over_evaluation_seeds_and_checks_every_target(bench) -> None:
    fidelity = bench["fidelity"]
    runs = {"2100/seed-11": _fidelity_entry(11, "tuning", 0.999, 1.0, 0.0, 0.0),
            "2100/seed-101": _fidelity_entry(101, "evaluation", 0.99, 0.85, 0.08, 0.004),
            "2100/seed-102": _fidelity_entry(102, "evaluation", 0.994, 0.75, 0.14, 0.012)}
    head = fidelity.headline(runs, "evaluation")["2100"]
    assert head["seeds"] == [101, 102]
    assert head["fraction_of_bayes"] == pytest.approx(0.992) and head["location_step_ratio"] == pytest.approx(0.8)
    assert head["met"] == {"fraction_of_bayes": True, "image_gap": True, "location_step_ratio": True,
                           "shares": False}  # a mean share gap of 0.11 is more than 10 points
    assert fidelity.headline(runs, "tuning")["2100"]["seeds"] == [11]
    assert fidelity._verdict(runs["2100/seed-102"]) == {"fraction_of_bayes": True, "image_gap": False,
                                                         "location_step_ratio": False, "shares": False}
