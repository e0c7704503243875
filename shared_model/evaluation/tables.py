"""`metrics_table`: metrics of a table of scores, overall and per group (`llnm-server evaluate-predictions`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared_model.evaluation.binary import binary_metrics

if TYPE_CHECKING:
    import pandas as pd

def metrics_table(
    df: pd.DataFrame,
    label_col: str,
    score_col: str,
    group_col: str | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """`binary_metrics` per group of a table (all rows under ``"all"`` when ``group_col`` is None).

    Groups keep their order of first appearance; keys are ``str(group value)``. Every group is bootstrapped
    with the same ``seed``, so a group's result does not depend on which other groups are in the table.
    """
    needed = [c for c in (label_col, score_col, group_col) if c is not None]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        available = ", ".join(map(str, df.columns))
        names = ", ".join(map(repr, missing))
        raise ValueError(f"column(s) {names} not in the table; available: {available}")

    def one(part: pd.DataFrame, where: str) -> dict[str, Any]:
        try:
            return binary_metrics(
                part[label_col].to_numpy(),
                part[score_col].to_numpy(),
                threshold=threshold,
                n_bootstrap=n_bootstrap,
                ci=ci,
                seed=seed,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    if group_col is None:
        return {"all": one(df, "all rows")}
    if df[group_col].isna().any():
        first = df.index[df[group_col].isna()][0]
        raise ValueError(f"group column {group_col!r} is empty at index {first!r}")
    return {str(key): one(part, f"group {key!r}") for key, part in df.groupby(group_col, sort=False, dropna=False)}
