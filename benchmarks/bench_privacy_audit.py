"""An empirical audit of the patient-level guarantee: how much a membership attack learns about canary patients.

One-run auditing (Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023):

* **Canaries.** `--canaries` m patients made for the audit: random public-feature vectors (each view's image
  features and the report's, at the scale of a real patient's), no scalars, random labels. Each is put into the
  site's training split independently with probability 1/2 (a secret coin per canary), beside the site's real
  training patients.
* **Training.** The DP design (`configs/demo-dp.yaml`: the feature head on frozen public features, SGD 1.0 with
  momentum, batch 256 of the public count, per-patient clipping 1, 10 rounds of one local epoch) at one site,
  exactly as the ClientApp trains it (`PatientDPSession`: Opacus, Poisson sampling at the public rate, noise
  from the site's secret, the site's ledger), the model carried from round to round as if the site were alone:
  what an observer of every update this site releases in the run could see. At target epsilon 1, 3 and 8
  (delta 1e-5) and without DP (the same optimiser, no clipping or noise). The same canaries and coins for every
  setting.
* **Attack.** Each canary's margin under the final model, (2y - 1) x its logit: guess "in" for the k highest,
  "out" for the k lowest (k fixed before the run: `--guesses`).
* **Lower bound.** The largest epsilon for which P[Binomial(2k, e^eps / (1 + e^eps)) >= correct] <= 0.05 (the
  (eps, 0) analysis). With delta = 1e-5 the true bound on correct guesses is looser, so this can only overstate
  the lower bound: "it stays below the claimed epsilon" is a conservative check.

The pass/fail rule, fixed before the run: in every DP setting the lower bound is below the claimed epsilon; without
DP the attack's correct guesses are well above chance (a lower bound above 0).

    python benchmarks/bench_privacy_audit.py --data data/consortium --site site-a
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result  # noqa: E402

RULE = ("pass: in every DP setting the measured lower bound is below the claimed epsilon; without DP the lower "
        "bound is above 0 (the attack sees the leak); fixed before the run")


def epsilon_lower_bound(correct: int, guesses: int, alpha: float = 0.05) -> float:
    """The largest epsilon rejected at level alpha by `correct` of `guesses` (one-run auditing, (eps, 0))."""
    from scipy.stats import binom

    def tail(eps: float) -> float:
        return float(binom.sf(correct - 1, guesses, 1 / (1 + math.exp(-eps))))

    if tail(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def make_canaries(real: Any, m: int, seed: int) -> Any:
    """m canary patients in the site's feature layout: random directions at the real features' scale."""
    from shared_model.sitedata.public_features import PublicFeatures

    g = torch.Generator().manual_seed(seed)
    img_scale = float(real.image[real.view_mask > 0].norm(dim=-1).mean())
    txt_scale = float(real.text[real.text_mask[:, 0] > 0].norm(dim=-1).mean())
    image = torch.randn(m, 2, real.image.shape[-1], generator=g)
    image = image / image.norm(dim=-1, keepdim=True) * img_scale
    text = torch.randn(m, 1, real.text.shape[-1], generator=g)
    text = text / text.norm(dim=-1, keepdim=True) * txt_scale
    c = real.clinical.shape[-1]
    return PublicFeatures("canaries", [f"canary-{i:05d}" for i in range(m)], ["train"] * m, image,
                          torch.ones(m, 2), text, torch.ones(m, 1), torch.zeros(m, 2, c), torch.zeros(m, 2, c),
                          torch.randint(0, 2, (m,), generator=g).float(), torch.full((m,), -1, dtype=torch.long))


def train_site(features: Any, model_cfg: Any, train_cfg: Any, *, rounds: int, target: float | None,
               public_count: int, state_dir: Path, seed: int) -> tuple[Any, dict[str, Any]]:
    """The site's run: `rounds` rounds of local training on `features`, DP-SGD at `target` (None: no DP)."""
    from fl_client.privacy import PatientDPSession
    from fl_client.settings import SiteSettings
    from shared_model.config import PatientDPConfig
    from shared_model.model.architectures import build_model
    from shared_model.model.training import train_local, trainable_state
    from shared_model.sitedata.model_inputs import make_dataset

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    state = trainable_state(model)
    dataset = make_dataset(features)
    (state_dir / "site").mkdir(exist_ok=True)
    settings = SiteSettings(data_path=state_dir / "site", name="audit-site", cache_dir=None, device="cpu",
                            max_patient_epsilon=None, privacy_state_dir=state_dir / "privacy",
                            public_patient_count=public_count)
    metrics: dict[str, Any] = {}
    run = f"audit-eps-{target}"
    for rnd in range(1, rounds + 1):
        model = build_model(model_cfg)
        model.load_state_dict(state)
        cfg = train_cfg.model_copy(update={"seed": seed * 1000 + rnd, "device": "cpu"})
        if target is None:
            train_local(model, dataset, cfg, global_state=state)
        else:
            privacy = PatientDPConfig(enabled=True, target_epsilon=target, max_grad_norm=1.0)
            session = PatientDPSession.open(site_name="audit-site", run_id=run, settings=settings,
                                            privacy_cfg=privacy, train_patient_ids=list(features.patient_ids),
                                            batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                                            total_rounds=rounds, server_round=rnd,
                                            round_config={"run-id": run, "server-round": rnd})
            metrics = session.finish(train_local(model, dataset, cfg, global_state=state, hooks=session.hooks()))
        state = trainable_state(model)
    model = build_model(model_cfg)
    model.load_state_dict(state)
    return model, metrics


def margins(model: Any, canaries: Any) -> torch.Tensor:
    """(2y - 1) x the patient logit (the mean over its views) of each canary."""
    model.eval()
    with torch.no_grad():
        out = model(*canaries.batch()[:6])
    logit = (out.llnm_logits * canaries.view_mask).sum(dim=1) / canaries.view_mask.sum(dim=1)
    return (2 * canaries.llnm - 1) * logit


def markdown_table(result: dict[str, Any]) -> str:
    """The docs' table of an audit (`--out`'s JSON)."""
    rows = ["| setting | claimed epsilon (delta 1e-5) | correct guesses | membership AUC | epsilon lower bound | "
            "passes |", "|---|---|---|---|---|---|"]
    for r in result["results"]:
        claimed = "-" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.3f}"
        rows.append(f"| {r['setting']} | {claimed} | {r['correct']} / {r['guesses']} | {r['membership_auc']:.3f} | "
                    f"{r['epsilon_lower_bound']:.2f} | {'yes' if r['passes'] else 'NO'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from fl_server.config import load_config
    from shared_model.sitedata.model_inputs import load_site_inputs
    from shared_model.sitedata.public_features import _FIELDS, PublicFeatures

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a consortium folder")
    p.add_argument("--site", default="site-a", help="the audited site")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo-dp.yaml")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--guesses", type=int, default=100, help="k: guesses 'in' and k guesses 'out'")
    p.add_argument("--epsilons", default="1,3,8,none")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy_audit.json")
    p.add_argument("--table", action="store_true", help="print the docs' table from --out and stop")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    if args.data is None:
        p.error("--data is required (or --table)")
    started = time.time()
    made = provenance()  # the code as it starts, before anything can change the tree
    torch.set_num_threads(1)
    exp = load_config(args.config)
    model_cfg = exp.architecture()
    features = load_site_inputs(args.data / args.site, exp.preprocess, model_cfg).subset("train")
    canaries = make_canaries(features, args.canaries, args.seed)
    coins = torch.rand(args.canaries, generator=torch.Generator().manual_seed(args.seed + 7)) < 0.5
    inside = [int(i) for i in torch.nonzero(coins).flatten()]
    # The site's training split with the canaries whose coin came up "in".
    training = PublicFeatures(args.site, [*features.patient_ids, *(canaries.patient_ids[i] for i in inside)],
                              ["train"] * (len(features) + len(inside)),
                              *(torch.cat([getattr(features, name), getattr(canaries, name)[inside]])
                                for name in _FIELDS))
    # The public count is declared before the coins are drawn: the real patients and half the canaries.
    public_count = len(features) + args.canaries // 2
    results = []
    for eps_text in args.epsilons.split(","):
        target = None if eps_text == "none" else float(eps_text)
        with tempfile.TemporaryDirectory() as tmp:
            model, metrics = train_site(training, model_cfg, exp.train, rounds=exp.federation.rounds, target=target,
                                        public_count=public_count, state_dir=Path(tmp), seed=args.seed)
        score = margins(model, canaries)
        order = torch.argsort(score)
        k = args.guesses
        guessed_in, guessed_out = order[-k:], order[:k]
        correct = int(coins[guessed_in].sum() + (~coins[guessed_out]).sum())
        from sklearn.metrics import roc_auc_score

        lower = epsilon_lower_bound(correct, 2 * k)
        claimed = metrics.get("dp-epsilon")
        entry = {"setting": "no DP" if target is None else f"epsilon {target:g}", "target_epsilon": target,
                 "claimed_epsilon": claimed, "delta": 1e-5 if target is not None else None,
                 "noise_multiplier": metrics.get("dp-noise-multiplier"), "sample_rate": metrics.get("dp-sample-rate"),
                 "steps": metrics.get("dp-steps-total"), "correct": correct, "guesses": 2 * k,
                 "accuracy": correct / (2 * k), "membership_auc": float(roc_auc_score(coins.numpy(), score.numpy())),
                 "epsilon_lower_bound": lower,
                 "passes": (lower < claimed) if claimed is not None else lower > 0}
        results.append(entry)
        print(f"{entry['setting']}: {correct}/{2 * k} correct, membership AUC {entry['membership_auc']:.3f}, "
              f"epsilon lower bound {lower:.3f}" + (f" (claimed {claimed:.3f})" if claimed else ""), flush=True)
    out = {"description": __doc__.split("\n\n")[0], "rule": RULE,
           "setup": {"data": str(args.data), "site": args.site, "config": str(args.config.relative_to(ROOT)),
                     "real_training_patients": len(features), "canaries": args.canaries,
                     "canaries_in": int(coins.sum()), "public_count": public_count,
                     "rounds": exp.federation.rounds, "batch_size": exp.train.batch_size,
                     "guesses_per_side": args.guesses, "seed": args.seed,
                     "analysis": "one-run auditing, (eps, 0) binomial tail at 95% confidence"},
           "results": results, "passes": all(r["passes"] for r in results),
           "seconds": round(time.time() - started, 1)}
    write_result(args.out, out, made, default=float)
    print(f"wrote {args.out}: {'PASS' if out['passes'] else 'FAIL'}")
    return 0 if out["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
