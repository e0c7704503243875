"""Experiment tracking: per-site metrics and privacy spent, logged every round to TensorBoard.

TensorBoard rather than MLflow: its event files are plain local files under the run directory (nothing to
serve while the run goes, no database), it is a single dependency, and `tensorboard --logdir RUN_DIR/tensorboard`
opens every run of a folder side by side. Tags are ``<metric>/<site>`` (and ``<metric>/pooled``), so each
metric is one chart with a line per site:

* ``<split>_auc``, ``<split>_brier``, ``<split>_ece`` per site and pooled, every round;
* ``train_loss`` per site (absent under patient-level DP, where sites do not send it);
* ``dp_epsilon`` (this run) per site, and ``site_dp_epsilon/consortium``, whenever privacy is on: the same
  numbers as privacy.json (a site's lifetime epsilon stays at the site);
* ``final_auc`` per site at the final model's round, and the explanation shares as text;
* in a segmentation run, ``<split>_dice_<structure>`` and ``<split>_capsule_error_mm_abs`` per site and pooled
  (``final_`` for the final model).

On resume the writer purges the events of the rounds being redone, so a chart never shows a round twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fl_server.records import FinalRecord, RoundRecord
from shared_model import protocol
from shared_model.numbers import finite_or_none

__all__ = ["RoundTracker", "open_tracker"]


class RoundTracker:
    """A TensorBoard writer for one run directory."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        number = finite_or_none(value)
        if number is not None:
            self.writer.add_scalar(tag, number, step)

    def _segmentation(self, prefix: str, site: str, m: dict[str, Any], step: int) -> None:
        """A segmentation round's Dice per structure and capsule-distance error (nothing for LLNM-Net's)."""
        for structure in ("thyroid", "nodule"):
            self._scalar(f"{prefix}dice_{structure}/{site}", (m.get(structure) or {}).get("dice"), step)
        self._scalar(f"{prefix}capsule_error_mm_abs/{site}", (m.get("capsule_error_mm") or {}).get("mean_abs"), step)

    def log_round(self, entry: RoundRecord, privacy: dict[str, Any] | None = None) -> None:
        step, split = int(entry["round"]), entry.get("split", "val")
        for site, m in [*entry.get("sites", {}).items(), ("pooled", entry.get("pooled") or {})]:
            for key in ("auc", "brier", "ece"):
                self._scalar(f"{split}_{key}/{site}", m.get(key), step)
            self._segmentation(f"{split}_", site, m, step)
        for site, m in entry.get("train", {}).items():
            self._scalar(f"train_loss/{site}", m.get(protocol.TRAIN_LOSS), step)
            self._scalar(f"dp_epsilon/{site}", m.get(protocol.DP_EPSILON), step)
        if privacy:
            self._scalar("site_dp_epsilon/consortium", (privacy.get("server") or {}).get("epsilon"), step)
        self.writer.flush()

    def log_final(self, final: FinalRecord) -> None:
        step = int(final["round"])
        for site, m in [*final.get("sites", {}).items(), ("pooled", final.get("pooled") or {})]:
            self._scalar(f"final_auc/{site}", m.get("auc"), step)
            self._segmentation("final_", site, m, step)
        expl = final.get("explanations")
        if expl and expl.get("shares"):
            self.writer.add_text("explanations/feature_group_shares",
                                 "```\n" + json.dumps(expl["shares"], indent=1) + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(backend: str, log_dir: Path, start_round: int) -> RoundTracker | None:
    """The tracker the experiment asks for (None for ``tracking.backend: none``)."""
    if backend == "none":
        return None
    return RoundTracker(log_dir, purge_step=start_round if start_round > 1 else None)
