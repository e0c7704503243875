"""Synthetic seven-centre LLNM consortium (``llnm-synth``).

Writes site folders in the site data contract (docs/site-data.md) with ultrasound DICOM images (transverse
and longitudinal views), nodule and thyroid masks, free-text reports whose wording differs by site, and a
clinical table, plus the hidden per-patient truth and ``consortium.json``. Labels come from a documented
logistic risk model (docs/synthetic.md) in which every modality carries information the others lack, so a
model has to use all of them. See :func:`generate_consortium` and :func:`sample_patients`.

Names are loaded on first use, so that rendering worker processes (which import
``fl_research.synthetic.worker``) do not pay for pandas and scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generate_consortium": "generator",
    "stratified_splits": "generator",
    "SITE_PROFILES": "profiles",
    "SITE_PROPORTIONS": "profiles",
    "PAPER_PROPORTIONS": "profiles",
    "LAYOUTS": "profiles",
    "site_sizes": "profiles",
    "DEFAULT_MODEL": "risk_model",
    "FEATURES": "risk_model",
    "RiskModel": "risk_model",
    "expected_risk": "risk_model",
    "sample_patients": "risk_model",
    "site_intercept": "risk_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
