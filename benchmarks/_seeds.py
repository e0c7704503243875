"""Which synthetic consortia design decisions looked at, and which are kept for evaluation.

A benchmark that compares designs takes ``--tuning-seeds`` (consortia a design may be chosen on; their results are
reported apart and labelled) and ``--evaluation-seeds`` (consortia whose results are the headline). An evaluation
seed that any design decision of this project has looked at is refused, naming the decision, so a headline can
never be measured on its own tuning data. Every result file records both lists.

A seed here is ``llnm-synth --seed``; a consortium is also defined by its profile and size, but the registry is by
seed alone, the stricter rule: a seed looked at under one profile is not an evaluation seed under another.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

#: Consortium seeds that design decisions looked at, with what was decided on them.
LOOKED_AT: dict[int, str] = {
    0: "the demo consortium (make demo) and the DP design of configs/demo-dp.yaml (data/paper-9836, seed 0)",
    1: "the federated schedule (federation.rounds_per_epoch, the demo's rounds) and the model benchmarks",
    2: "the federated schedule (federation.rounds_per_epoch, the demo's rounds)",
    3: "the federated schedule (federation.rounds_per_epoch, the demo's rounds)",
    7: "the demo consortium of make demo (seed 7): the segmenter's settings (configs/segment.yaml) were explored on it",
    11: "LLNM-Net's image pathway and schedule on the paper-calibrated profile",
    12: "LLNM-Net's image pathway and schedule on the paper-calibrated profile",
    2501: "the measurements issue 27 was filed on (9,836 patients, the model and DP gaps it reports)",
}

#: The seeds design work may use (a subset of LOOKED_AT) and the seeds kept for evaluation.
DEFAULT_TUNING_SEEDS: tuple[int, ...] = (11, 12)
DEFAULT_EVALUATION_SEEDS: tuple[int, ...] = (101, 102, 103)


def parse_seeds(text: str, option: str) -> list[int]:
    """``"1,2,3"`` as a list of distinct non-negative seeds; an error names the option."""
    seeds: list[int] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if not token.isdigit():
            raise ValueError(f"{option}: {token!r} is not a non-negative integer seed")
        if int(token) in seeds:
            raise ValueError(f"{option}: seed {token} is listed twice")
        seeds.append(int(token))
    return seeds


def check_protocol(tuning: Iterable[int], evaluation: Iterable[int], *, minimum: int = 1) -> dict[str, object]:
    """The seed protocol of one benchmark run, after refusing evaluation seeds that were looked at.

    Raises ValueError when an evaluation seed is a tuning seed or is in :data:`LOOKED_AT`, or when there are fewer
    than ``minimum`` evaluation seeds. Returns the record every result file carries.
    """
    tuning, evaluation = list(tuning), list(evaluation)
    both = sorted(set(tuning) & set(evaluation))
    if both:
        raise ValueError(f"seed(s) {both} are both tuning and evaluation seeds")
    seen = {s: LOOKED_AT[s] for s in evaluation if s in LOOKED_AT}
    if seen:
        named = "; ".join(f"{s}: {why}" for s, why in sorted(seen.items()))
        raise ValueError(f"evaluation seed(s) {sorted(seen)} were looked at by design decisions ({named}); "
                         "choose seeds no decision has seen (benchmarks/_seeds.py)")
    if len(evaluation) < minimum:
        raise ValueError(f"at least {minimum} evaluation seed(s) are needed, got {len(evaluation)}")
    return {"tuning_seeds": tuning, "evaluation_seeds": evaluation,
            "rule": "the headline is the mean over the evaluation seeds only; no design decision looked at them "
                    "(benchmarks/_seeds.py lists the seeds that were looked at and why)",
            "looked_at": {str(s): why for s, why in sorted(LOOKED_AT.items())}}


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tuning-seeds`` and ``--evaluation-seeds``, as every benchmark of this protocol takes them."""
    parser.add_argument("--tuning-seeds", default="",
                        help="consortium seeds (llnm-synth --seed) a design may have been chosen on, comma-separated; "
                             "measured and summarised apart from the headline")
    parser.add_argument("--evaluation-seeds", default=",".join(map(str, DEFAULT_EVALUATION_SEEDS)),
                        help="consortium seeds no design decision looked at: the headline (benchmarks/_seeds.py "
                             "refuses any other)")


def seeds_from_arguments(args: argparse.Namespace, program: str,
                         minimum: int = 0) -> tuple[list[int], list[int], dict[str, object]] | None:
    """(tuning, evaluation, protocol record) from the parsed arguments; None after printing the reason on stderr."""
    try:
        tuning = parse_seeds(args.tuning_seeds, "--tuning-seeds")
        evaluation = parse_seeds(args.evaluation_seeds, "--evaluation-seeds")
        return tuning, evaluation, check_protocol(tuning, evaluation, minimum=minimum)
    except ValueError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return None


def consortium_for_seed(pattern: str, profile: str, patients: int, seed: int) -> Path:
    """The seed's consortium folder (``pattern`` with {profile}, {patients}, {seed}), generated when absent."""
    data = Path(pattern.format(profile=profile, patients=patients, seed=seed)).resolve()
    if not (data / "consortium.json").is_file():
        print(f"[bench] generating {data} ...", flush=True)
        subprocess.run([str(Path(sys.executable).parent / "llnm-synth"), "--out", str(data), "--sites", "7",
                        "--profile", profile, "--patients", str(patients), "--seed", str(seed), "--quiet",
                        *(["--overwrite"] if data.exists() else [])], check=True)
    return data
