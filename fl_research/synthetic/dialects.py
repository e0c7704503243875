"""The seven site dialects of the synthetic radiology reports (`fl_research.synthetic.reports`).

One template per site: its layout (structured headings, narrative prose, bullet lists, telegraphic notes), its
vocabulary and abbreviations, units and way of giving the size. Each takes the patient's facts, which findings
the site mentions this time, the site's report style and the random generator, and returns the report's lines.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .facts import ReportFacts
from .profiles import ReportStyle

__all__ = ["DIALECTS", "Dialect", "reveals_shape"]

_LEVELS = ("II", "III", "IV", "III/IV", "II-III", "V")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def _mm(value: float) -> str:
    return f"{value:.1f}"


def _cm(value_mm: float) -> str:
    return f"{value_mm / 10.0:.2f}"


def _dims(f: ReportFacts, style: ReportStyle) -> tuple[str, bool]:
    """Size text in the site's units and order; True when all three dimensions (hence the shape) are given."""
    conv = _mm if style.units == "mm" else _cm
    if style.dims == "max":
        return f"{conv(f.size_mm)} {style.units}", False
    if style.dims == "three":
        return f"{conv(f.width_mm)} x {conv(f.depth_mm)} x {conv(f.length_mm)} {style.units}", True
    if style.dims == "three_lwd":
        return f"{conv(f.length_mm)} x {conv(f.width_mm)} x {conv(f.depth_mm)} {style.units}", True
    raise ValueError(f"unknown dimension style {style.dims!r}")


def _lobe_dims(rng: np.random.Generator, units: str) -> str:
    """Random, normal-range lobe dimensions (independent of the nodule, so they leak nothing)."""
    vals = [rng.uniform(38, 52), rng.uniform(13, 20), rng.uniform(12, 19)]
    if units == "cm":
        return " x ".join(f"{v / 10:.1f}" for v in vals) + " cm"
    return " x ".join(f"{v:.0f}" for v in vals) + " mm"


def _node_sentence(rng: np.random.Generator, side: str, variants: tuple[str, ...]) -> str:
    feature = _pick(
        rng,
        (
            "cystic change",
            "microcalcifications",
            "loss of the fatty hilum",
            "a rounded shape and absent hilum",
            "peripheral vascularity",
        ),
    )
    return _pick(rng, variants).format(level=_pick(rng, _LEVELS), side=side, feature=feature)


# --- site dialects ---------------------------------------------------------------------------------------
# Each takes the facts, which findings to mention, the site style and an rng, and returns the report lines.

Dialect = Callable[[ReportFacts, dict[str, bool], ReportStyle, np.random.Generator], list[str]]


def _site_a(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    third = {"upper": "upper third", "middle": "middle third", "lower": "lower third"}[f.third]
    comp = {
        "solid": "solid",
        "predominantly solid": "predominantly solid",
        "mixed cystic-solid": "mixed cystic and solid",
    }[f.composition]
    echo = {
        "hyperechoic": "hyperechoic",
        "isoechoic": "isoechoic",
        "hypoechoic": "hypoechoic",
        "markedly hypoechoic": "markedly hypoechoic",
    }[f.echogenicity]
    margin = {
        "smooth": "smooth",
        "ill-defined": "ill-defined",
        "lobulated": "lobulated",
        "irregular": "irregular",
        "extrathyroidal": "irregular, with extrathyroidal extension",
    }[f.margin]
    lines = [
        "EXAMINATION: Ultrasound of the thyroid gland.",
        "CLINICAL INDICATION: "
        + _pick(
            rng,
            (
                "Thyroid nodule, preoperative assessment.",
                "Known thyroid carcinoma, staging.",
                "Thyroid nodule.",
            ),
        ),
    ]
    lines.append("FINDINGS:")
    lines.append(
        f"Right lobe: {_lobe_dims(rng, 'mm')}. Left lobe: {_lobe_dims(rng, 'mm')}. "
        f"Isthmus: {rng.uniform(2, 5):.0f} mm."
    )
    lines.append(
        "Parenchyma: "
        + (
            "heterogeneous echotexture, consistent with diffuse thyroid disease."
            if f.diffuse_disease
            else "homogeneous echotexture."
        )
    )
    parts = []
    parts.append(
        f"Dominant nodule in the {third} of the {f.lobe} lobe." if m["location"] else "Dominant nodule."
    )
    if m["size"]:
        parts.append(f"Size {_dims(f, st)[0]} (W x AP x L).")
    if m["composition"]:
        parts.append(f"Composition: {comp}.")
    if m["echogenicity"]:
        parts.append(f"Echogenicity: {echo}.")
    if m["margin"]:
        parts.append(f"Margins: {margin}.")
    if m["calcification"]:
        parts.append(
            "Echogenic foci: "
            + ("punctate echogenic foci (microcalcifications)." if f.microcalcifications else "none.")
        )
    if m["shape"]:
        parts.append("Shape: " + ("taller-than-wide." if f.taller_than_wide else "wider-than-tall."))
    lines.append(" ".join(parts))
    if f.node_finding:
        lines.append(
            "LYMPH NODES: "
            + _node_sentence(
                rng,
                f.lobe,
                (
                    "Suspicious lateral cervical lymph node at level {level} on the {side} side, "
                    "with {feature}.",
                    "Abnormal {side} level {level} lymph node with {feature}, suspicious for metastasis.",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        lines.append("LYMPH NODES: No suspicious cervical lymph nodes.")
    lines.append(
        "IMPRESSION: "
        + (
            f"Dominant {f.lobe} thyroid nodule as described."
            if m["location"]
            else "Dominant thyroid nodule as described."
        )
    )
    return lines


def _site_b(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    side = {"right": "Rt", "left": "Lt"}[f.lobe]
    third = {"upper": "upper pole", "middle": "mid pole", "lower": "lower pole"}[f.third]
    comp = {"solid": "solid", "predominantly solid": "mostly solid", "mixed cystic-solid": "solid-cystic"}[
        f.composition
    ]
    echo = {
        "hyperechoic": "hyperech.",
        "isoechoic": "isoech.",
        "hypoechoic": "hypoech.",
        "markedly hypoechoic": "markedly hypoech.",
    }[f.echogenicity]
    margin = {
        "smooth": "margins well defined",
        "ill-defined": "margins indistinct",
        "lobulated": "margins microlobulated",
        "irregular": "margins irregular/angular",
        "extrathyroidal": "margins irregular with ETE",
    }[f.margin]
    lines = [f"US thyroid. Rt lobe {_lobe_dims(rng, 'mm')}, Lt lobe {_lobe_dims(rng, 'mm')}."]
    if f.diffuse_disease:
        lines.append("Echotexture heterogeneous.")
    desc = " ".join(x for x in (comp if m["composition"] else "", echo if m["echogenicity"] else "") if x)
    where = f" in {side} lobe {third}" if m["location"] else ""
    sentence = f"{desc.capitalize()} nodule{where}" if desc else f"Nodule{where}"
    if m["size"]:
        sentence += f", max diameter {_dims(f, st)[0].replace(' ', '')}"
    lines.append(sentence + ".")
    extra = []
    if m["margin"]:
        extra.append(margin.capitalize())
    if m["calcification"]:
        extra.append("MC+" if f.microcalcifications else "No MC")
    if m["shape"]:
        extra.append("TTW" if f.taller_than_wide else "not TTW")
    if extra:
        lines.append(". ".join(extra) + ".")
    if f.node_finding:
        lines.append(
            "Neck: "
            + _node_sentence(
                rng,
                side,
                (
                    "abnormal LN level {level} {side} with {feature} - suspicious for mets.",
                    "{side} lateral neck LN (level {level}), {feature}, susp.",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        lines.append("Neck: no abnormal LN.")
    lines.append("Conclusion: thyroid nodule, " + _pick(rng, ("FNA recommended.", "for surgical planning.")))
    return lines


def _site_c(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    third = {"upper": "superior portion", "middle": "mid portion", "lower": "inferior portion"}[f.third]
    comp = {
        "solid": "completely solid",
        "predominantly solid": "predominantly solid",
        "mixed cystic-solid": "mixed solid and cystic",
    }[f.composition]
    echo = {
        "hyperechoic": "hyperechoic",
        "isoechoic": "isoechoic",
        "hypoechoic": "hypoechoic",
        "markedly hypoechoic": "very hypoechoic (darker than strap muscle)",
    }[f.echogenicity]
    margin = {
        "smooth": "circumscribed, not irregular",
        "ill-defined": "poorly defined",
        "lobulated": "lobulated",
        "irregular": "spiculated",
        "extrathyroidal": "capsular breach with extrathyroidal extension",
    }[f.margin]
    lines = [
        "Thyroid ultrasound report",
        f"- Thyroid: right lobe {_lobe_dims(rng, 'cm')}; left lobe {_lobe_dims(rng, 'cm')}; "
        f"isthmus {rng.uniform(0.2, 0.5):.1f} cm; "
        + ("heterogeneous." if f.diffuse_disease else "normal echotexture."),
    ]
    items = {
        "location": f"- Nodule location: {f.lobe} lobe, {third}",
        "size": f"- Dimensions: {_dims(f, st)[0]} (L x W x AP)",
        "composition": f"- Composition: {comp}",
        "echogenicity": f"- Echogenicity: {echo}",
        "margin": f"- Margin: {margin}",
        "calcification": "- Echogenic foci: "
        + (
            "punctate, microcalcifications present"
            if f.microcalcifications
            else "absent, no microcalcifications"
        ),
        "shape": "- Orientation: "
        + ("taller than wide (non-parallel)" if f.taller_than_wide else "parallel, not taller than wide"),
    }
    lines.append("- Dominant nodule:")
    lines.extend(text for key, text in items.items() if m[key])
    if f.node_finding:
        lines.append(
            "- Cervical lymph nodes: "
            + _node_sentence(
                rng,
                f.lobe,
                (
                    "suspicious lateral cervical lymph node at level {level} on neck ultrasound "
                    "({side}), {feature}",
                    "{side} level {level} node with {feature}, suspicious",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        lines.append("- Cervical lymph nodes: no suspicious lateral nodes")
    lines.append(
        "Recommendation: "
        + _pick(rng, ("cytology correlation.", "surgical consultation.", "correlate with FNA result."))
    )
    return lines


def _site_d(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    side = {"right": "R", "left": "L"}[f.lobe]
    third = {"upper": "upper 1/3", "middle": "middle 1/3", "lower": "lower 1/3"}[f.third]
    comp = {
        "solid": "solid",
        "predominantly solid": "solid w small cystic areas",
        "mixed cystic-solid": "partly cystic",
    }[f.composition]
    echo = {
        "hyperechoic": "hyperechoic",
        "isoechoic": "isoechoic",
        "hypoechoic": "hypoechoic",
        "markedly hypoechoic": "marked hypoechogenicity",
    }[f.echogenicity]
    margin = {
        "smooth": "smooth margin",
        "ill-defined": "blurred margin",
        "lobulated": "lobulated margin",
        "irregular": "irreg margin",
        "extrathyroidal": "ETE present",
    }[f.margin]
    bits = []
    if m["location"]:
        bits.append(f"{side} lobe {third}:")
    head = " ".join(x for x in (echo if m["echogenicity"] else "", comp if m["composition"] else "") if x)
    bits.append(f"{head} nodule".strip())
    if m["size"]:
        bits.append(_dims(f, st)[0].replace(" ", ""))
    tail = []
    if m["margin"]:
        tail.append(margin)
    if m["calcification"]:
        tail.append("calcif +" if f.microcalcifications else "calcif -")
    if m["shape"]:
        tail.append("TTW" if f.taller_than_wide else "no TTW")
    lines = ["Thyroid: " + ("inhomogeneous parenchyma." if f.diffuse_disease else "size normal.")]
    body = " ".join(bits) + (", " + ", ".join(tail) if tail else "") + "."
    lines.append(body[0].upper() + body[1:])
    if f.node_finding:
        lines.append(
            "LN: "
            + _node_sentence(
                rng,
                side,
                (
                    "{side} level {level} abnormal node, {feature}.",
                    "susp lat LN lvl {level} ({side}), {feature}.",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        lines.append("LN: neg.")
    return lines


def _site_e(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    comp = {
        "solid": "solid",
        "predominantly solid": "predominantly solid",
        "mixed cystic-solid": "mixed cystic and solid",
    }[f.composition]
    echo = {
        "hyperechoic": "hyperechoic",
        "isoechoic": "isoechoic",
        "hypoechoic": "hypoechoic",
        "markedly hypoechoic": "markedly hypoechoic",
    }[f.echogenicity]
    margin = {
        "smooth": "Its margins are smooth and not irregular.",
        "ill-defined": "Its margins are ill-defined.",
        "lobulated": "Its margins are lobulated.",
        "irregular": "Its margins are irregular.",
        "extrathyroidal": "Its margins are irregular and there is extrathyroidal extension.",
    }[f.margin]
    sentences = [
        f"Date of examination: {f.study_date[:4]}-{f.study_date[4:6]}-{f.study_date[6:]}.",
        "The thyroid gland is normal in size.",
        "The background parenchyma is " + ("heterogeneous." if f.diffuse_disease else "homogeneous."),
    ]
    desc = ", ".join(x for x in (comp if m["composition"] else "", echo if m["echogenicity"] else "") if x)
    where = f"In the {f.third} third of the {f.lobe} lobe there is" if m["location"] else "There is"
    s = f"{where} {_article(desc)} {desc} nodule" if desc else f"{where} a nodule"
    if m["size"]:
        w, d, length = (_mm(f.width_mm), _mm(f.depth_mm), _mm(f.length_mm))
        s += f" measuring {w} mm (transverse) x {d} mm (AP) x {length} mm (longitudinal)"
    sentences.append(s + ".")
    findings = []
    if m["margin"]:
        findings.append(margin)
    if m["calcification"]:
        findings.append(
            "Microcalcifications are present."
            if f.microcalcifications
            else "There are no microcalcifications."
        )
    if m["shape"]:
        findings.append(
            "The nodule is taller-than-wide." if f.taller_than_wide else "The nodule is not taller-than-wide."
        )
    rng.shuffle(findings)  # this site's radiologists do not follow a fixed order
    sentences.extend(findings)
    if f.node_finding:
        sentences.append(
            "Assessment of the neck: "
            + _node_sentence(
                rng,
                f.lobe,
                (
                    "suspicious lateral cervical lymph node at level {level} on the {side}, with {feature}.",
                    "an abnormal lymph node with {feature} at {side} level {level}, "
                    "highly suspicious for metastasis.",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        sentences.append("Assessment of the neck: no suspicious lateral cervical lymph nodes.")
    return [" ".join(sentences)]


def _site_f(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    side = {"right": "R", "left": "L"}[f.lobe]
    third = {"upper": "upper third", "middle": "mid third", "lower": "lower third"}[f.third]
    comp = {"solid": "solid", "predominantly solid": "mostly solid", "mixed cystic-solid": "cystic-solid"}[
        f.composition
    ]
    echo = {
        "hyperechoic": "hyper",
        "isoechoic": "iso",
        "hypoechoic": "hypo",
        "markedly hypoechoic": "very hypo",
    }[f.echogenicity]
    margin = {
        "smooth": "margin smooth",
        "ill-defined": "margin unclear",
        "lobulated": "margin lobulated",
        "irregular": "margin irregular",
        "extrathyroidal": "margin irregular + ETE",
    }[f.margin]
    segs = ["THY US"]
    if m["location"]:
        segs.append(f"{side} lobe {third}")
    segs.append("nodule" + (f" {_dims(f, st)[0]}" if m["size"] else ""))
    feats = []
    if m["composition"]:
        feats.append(comp)
    if m["echogenicity"]:
        feats.append(echo)
    if m["margin"]:
        feats.append(margin)
    if m["calcification"]:
        feats.append("microcalc +" if f.microcalcifications else "no calc")
    if m["shape"]:
        feats.append("TTW+" if f.taller_than_wide else "TTW-")
    if feats:
        segs.append(" / ".join(feats))
    if f.diffuse_disease:
        segs.append("bg heterogeneous")
    if f.node_finding:
        segs.append(
            "LN: "
            + _node_sentence(
                rng,
                side,
                ("lvl {level} {side} node, {feature}, susp", "abn node {side} lvl {level} ({feature})"),
            )
        )
    elif rng.random() < st.node_negative_prob:
        segs.append("LN: none")
    return [" // ".join(segs)]


def _site_g(f: ReportFacts, m: dict[str, bool], st: ReportStyle, rng: np.random.Generator) -> list[str]:
    third = {"upper": "upper pole", "middle": "interpolar region", "lower": "lower pole"}[f.third]
    comp = {
        "solid": "solid",
        "predominantly solid": "predominantly solid",
        "mixed cystic-solid": "partly cystic",
    }[f.composition]
    echo = {
        "hyperechoic": "hyperechoic",
        "isoechoic": "isoechoic",
        "hypoechoic": "hypoechoic",
        "markedly hypoechoic": "markedly hypoechoic",
    }[f.echogenicity]
    margin = {
        "smooth": "The margins are well circumscribed.",
        "ill-defined": "The margins are poorly defined.",
        "lobulated": "The margins are lobulated.",
        "irregular": "The margins are irregular.",
        "extrathyroidal": "The margins are irregular with extrathyroidal extension.",
    }[f.margin]
    text = [
        "Ultrasound thyroid.",
        "Both lobes are of normal size"
        + (" with a coarse, heterogeneous echotexture." if f.diffuse_disease else " and echotexture."),
    ]
    desc = " ".join(x for x in (comp if m["composition"] else "", echo if m["echogenicity"] else "") if x)
    where = f"Within the {third} of the {f.lobe} lobe is" if m["location"] else "There is"
    s = f"{where} {_article(desc)} {desc} nodule" if desc else f"{where} a nodule"
    if m["size"]:
        s += f" measuring {_dims(f, st)[0]}"
    text.append(s + ".")
    if m["margin"]:
        text.append(margin)
    if m["calcification"]:
        text.append(
            "Microcalcification is present." if f.microcalcifications else "No microcalcification is seen."
        )
    if m["shape"]:
        text.append("It is taller than wide." if f.taller_than_wide else "It is wider than tall.")
    if f.node_finding:
        text.append(
            "Lymph nodes: "
            + _node_sentence(
                rng,
                f.lobe,
                (
                    "abnormal lymph node with {feature} at level {level} on the {side}, "
                    "suspicious for nodal disease.",
                    "a suspicious lateral cervical lymph node is seen at level {level} ({side}) "
                    "with {feature}.",
                ),
            )
        )
    elif rng.random() < st.node_negative_prob:
        text.append("No abnormal cervical lymphadenopathy.")
    text.append(
        "Opinion: "
        + _pick(rng, ("Thyroid nodule as described. Suggest FNA.", "Nodule as above, for MDT discussion."))
    )
    return [" ".join(text[:2]), " ".join(text[2:])]


DIALECTS: dict[str, Dialect] = {
    "site-a": _site_a,
    "site-b": _site_b,
    "site-c": _site_c,
    "site-d": _site_d,
    "site-e": _site_e,
    "site-f": _site_f,
    "site-g": _site_g,
}


def reveals_shape(facts: ReportFacts, style: ReportStyle) -> bool:
    """Whether a size sentence in this style gives width and depth both (taller-than-wide can be read off)."""
    return _dims(facts, style)[1]
