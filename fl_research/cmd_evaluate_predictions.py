"""`llnm-server evaluate-predictions`: evaluation metrics of a CSV of scores and labels, per group.

Why a command: baselines, federated runs and published results (e.g. the LLNM-Net Source Data) end up as
tables of per-patient scores; this turns any such table into the metrics of
`shared_model.evaluation.metrics.binary_metrics` (JSON, one entry per group), so all of them are compared with one
implementation.

The CSV is read with the `csv` module rather than pandas so that every problem is reported with its exact file
line (blank lines and quoted line breaks included). Bad input exits with status 2 and a message naming the
file, the line and the column.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared_model.evaluation.metrics import decision_curve, metrics_table

PROG = "llnm-server evaluate-predictions"
# How many offending rows an error or warning quotes before summarising the rest as a count.
_MAX_QUOTED_ROWS = 5


class InputError(Exception):
    """Bad input: the message names the file, line and column concerned."""


@dataclass(frozen=True)
class Predictions:
    """The columns the command needs, parsed and validated, with the file line of each row."""

    labels: np.ndarray
    scores: np.ndarray
    groups: list[str] | None
    lines: np.ndarray


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _coverage(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (e.g. 0.95), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on its sub-parser."""
    parser.add_argument("csv", type=Path, help="CSV file with a header row, one row per patient")
    parser.add_argument("--label-col", required=True, help="column holding the true label (0 or 1)")
    parser.add_argument("--score-col", required=True, help="column holding the model score (probability)")
    parser.add_argument("--group-col", help="report metrics per value of this column (default: all rows)")
    parser.add_argument(
        "--threshold", type=_finite_float, default=0.5, help="positive when score >= this (default 0.5)"
    )
    parser.add_argument(
        "--bootstrap",
        type=_non_negative_int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of patients for the confidence intervals; 0 for none (default 1000)",
    )
    parser.add_argument(
        "--ci",
        type=_coverage,
        default=0.95,
        metavar="LEVEL",
        help="coverage of the percentile bootstrap intervals (default 0.95)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--decision-curve",
        action="store_true",
        help="add each group's decision curve (net benefit at thresholds 0.01..0.98)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here instead of printing it")


def _quote(problems: list[str]) -> str:
    head = "; ".join(problems[:_MAX_QUOTED_ROWS])
    rest = len(problems) - _MAX_QUOTED_ROWS
    return head + (f" (and {rest} more bad row(s))" if rest > 0 else "")


def read_predictions(path: Path, label_col: str, score_col: str, group_col: str | None) -> Predictions:
    """Read and validate the needed columns of a predictions CSV; raise `InputError` naming what is wrong."""
    needed = [label_col, score_col] + ([group_col] if group_col is not None else [])
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: the file is empty (expected a header row)")
            missing = [c for c in needed if c not in header]
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise InputError(
                    f"{path}: column(s) {names} not found; available columns: {', '.join(header) or '(none)'}"
                )
            for c in needed:
                if header.count(c) > 1:
                    raise InputError(f"{path}: column {c!r} appears {header.count(c)} times in the header")
            cols = [header.index(c) for c in needed]
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or all(not field.strip() for field in row):
                    continue
                if len(row) != len(header):
                    raise InputError(f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
                rows.append([row[i] for i in cols])
                lines.append(reader.line_num)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a CSV file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no data rows after the header")

    labels = np.empty(len(rows), dtype=np.int64)
    scores = np.empty(len(rows), dtype=np.float64)
    problems: list[str] = []
    for k, (row, line) in enumerate(zip(rows, lines, strict=True)):
        label_text, score_text = row[0].strip(), row[1].strip()
        try:
            score = float(score_text)
        except ValueError:
            what = "is empty" if not score_text else f"has {score_text!r}, which is not a number"
            problems.append(f"line {line}: score column {score_col!r} {what}")
        else:
            if math.isfinite(score):
                scores[k] = score
            else:
                problems.append(f"line {line}: score column {score_col!r} has {score_text!r}: not finite")
        try:
            label = float(label_text)
        except ValueError:
            label = math.nan
        if label in (0.0, 1.0):
            labels[k] = int(label)
        else:
            problems.append(f"line {line}: label column {label_col!r} has {label_text!r}, not 0 or 1")
        if group_col is not None and not row[2].strip():
            problems.append(f"line {line}: group column {group_col!r} is empty")
    if problems:
        raise InputError(f"{path}: {_quote(problems)}")
    groups = [row[2].strip() for row in rows] if group_col is not None else None
    return Predictions(labels=labels, scores=scores, groups=groups, lines=np.asarray(lines))


def evaluate(pred: Predictions, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Metrics per group (and decision curves when asked) of validated predictions."""
    frame = pd.DataFrame({"label": pred.labels, "score": pred.scores})
    if pred.groups is not None:
        frame["group"] = pred.groups
    table = metrics_table(
        frame,
        "label",
        "score",
        "group" if pred.groups is not None else None,
        threshold=args.threshold,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        ci=args.ci,
    )
    if args.decision_curve:
        for key, result in table.items():
            in_group = frame["group"] == key if pred.groups is not None else pd.Series(True, index=frame.index)
            mask = in_group.to_numpy()
            if result["n_scores_outside_0_1"]:
                result["decision_curve"] = None
            else:
                result["decision_curve"] = decision_curve(pred.labels[mask], pred.scores[mask])
    return table


def _warn_out_of_range(pred: Predictions, args: argparse.Namespace) -> None:
    """Tell the user about scores that are not probabilities: AUC still works, calibration metrics do not."""
    outside = np.flatnonzero((pred.scores < 0.0) | (pred.scores > 1.0))
    if not outside.size:
        return
    quoted = [f"line {pred.lines[i]}: {float(pred.scores[i])!r}" for i in outside]
    affected = sorted({pred.groups[i] for i in outside}) if pred.groups is not None else ["all"]
    nulls = "Brier, ECE" + (" and the decision curve" if args.decision_curve else "")
    print(
        f"{PROG}: warning: {args.csv}: {outside.size} score(s) in column {args.score_col!r} outside [0, 1] "
        f"({_quote(quoted)}); AUC and threshold metrics use them as given, {nulls} are null for "
        f"group(s) {', '.join(affected)}",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Read, evaluate, print or write the JSON; exit status 2 on bad input."""
    try:
        pred = read_predictions(args.csv, args.label_col, args.score_col, args.group_col)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _warn_out_of_range(pred, args)
    text = json.dumps(evaluate(pred, args), indent=2, allow_nan=False)
    if args.out is None:
        print(text)
        return 0
    try:
        args.out.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {args.out}", file=sys.stderr)
    return 0
