"""Free-text radiology reports, written differently at every site.

Each site has its own template (structured headings, narrative prose, bullet lists, telegraphic notes),
vocabulary and abbreviations for every finding, units (mm or cm) and way of giving the size, its own
habits of omission (each finding is mentioned with a site-specific probability, independent of its value,
so an omission carries no information) and a typo rate. Negative findings are written as negations
("no microcalcifications", "margins not irregular", "not taller-than-wide").

A report may carry a clinician finding that no image shows: a suspicious lateral cervical lymph node seen
on neck ultrasound. It is always written when present, so the report reveals it either way; it is the
strongest single predictor of LLNM in the risk model.

:func:`write_report` returns the text and the set of risk-model features the text reveals, which is what
the report modality's best reachable AUC is computed from. The seven sites' templates are in
:mod:`fl_research.synthetic.dialects`.
"""

from __future__ import annotations

import numpy as np

from .dialects import DIALECTS, reveals_shape
from .facts import ReportFacts
from .profiles import SiteProfile
from .variants import dialect_of

FINDING_FEATURES: dict[str, frozenset[str]] = {
    "location": frozenset({"lobe", "third"}),
    "size": frozenset({"size"}),
    "composition": frozenset({"composition"}),
    "echogenicity": frozenset({"echogenicity"}),
    "margin": frozenset({"margin"}),
    "calcification": frozenset({"microcalc"}),
    "shape": frozenset({"shape"}),
}

_NEIGHBOURS = "qwertyuiopasdfghjklzxcvbnm"


def add_typos(text: str, rate: float, rng: np.random.Generator) -> str:
    """Occasional typing errors in longer words (swap, drop, double or neighbour key)."""
    if rate <= 0:
        return text
    out = []
    for token in text.split(" "):
        core = token.strip(".,:;()/")
        if len(core) >= 5 and core.isalpha() and rng.random() < rate:
            i = int(rng.integers(1, len(core) - 1))
            kind = int(rng.integers(4))
            if kind == 0:
                new = core[:i] + core[i + 1] + core[i] + core[i + 2 :]
            elif kind == 1:
                new = core[:i] + core[i + 1 :]
            elif kind == 2:
                new = core[:i] + core[i] + core[i:]
            else:
                new = core[:i] + _NEIGHBOURS[int(rng.integers(len(_NEIGHBOURS)))] + core[i + 1 :]
            token = token.replace(core, new, 1)
        out.append(token)
    return " ".join(out)


def write_report(
    facts: ReportFacts, profile: SiteProfile, rng: np.random.Generator
) -> tuple[str, frozenset[str]]:
    """The site's report for one patient, and the risk-model features its text reveals."""
    try:
        dialect = DIALECTS[dialect_of(profile)]
    except KeyError as exc:
        raise ValueError(f"no report dialect for site {profile.name!r}") from exc
    style = profile.report
    mention = {key: bool(rng.random() < p) for key, p in style.mention.items()}
    lines = dialect(facts, mention, style, rng)
    text = "\n".join(add_typos(line, style.typo_rate, rng) for line in lines) + "\n"
    revealed: set[str] = {"node"}
    for key, shown in mention.items():
        if shown:
            revealed |= FINDING_FEATURES[key]
    if mention["size"] and reveals_shape(facts, style):
        revealed.add("shape")  # width and depth are both given, so taller-than-wide can be read off
    return text, frozenset(revealed)
