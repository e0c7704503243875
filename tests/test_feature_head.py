"""The small head on frozen public features (`model.preset: feature-head`) and `privacy.patient.trainable`.

Fast: the head's interface, its per-patient normalisation, Opacus' per-sample gradients through it, the pinned
EfficientNet-Lite0 weights, the trainable subsets of LLNM-Net. Slow: public features of a real synthetic site,
computed once and then loaded from the cache (the backbone is not run again), and one DP federated round of the
head in Flower's simulation engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from shared_model.model.architectures import build_model, restrict_trainable
from shared_model.model.backbone import BACKBONE_SHA256, IMAGE_DIM, ImageBackbone, backbone_path
from shared_model.model.configuration import ModelConfig
from shared_model.model.feature_head import FEATURE_NORM, FeatureHeadNet, _normalise
from shared_model.sitedata.model_inputs import make_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD = ModelConfig.preset("feature-head")


def feature_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    c = HEAD.num_clinical
    return (torch.rand(n, 2, IMAGE_DIM, generator=g), torch.ones(n, 2), torch.randn(n, 1, HEAD.text_dim, generator=g),
            torch.ones(n, 1), torch.randn(n, 2, c, generator=g), torch.ones(n, 2, c),
            torch.randint(0, 2, (n,), generator=g).float(), torch.full((n,), -1))


def test_feature_head_is_small_starts_at_the_prior_and_has_llnmnets_interface() -> None:
    model = build_model(HEAD)
    assert isinstance(model, FeatureHeadNet)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 1000, n_params  # what DP-SGD can afford (docs/privacy.md)
    out = model(*feature_batch(5)[:6])
    assert out.llnm_logits.shape == (5, 2) and out.stage_logits is None
    assert torch.all(out.llnm_logits == 0)  # zero-initialised output layers: every patient at 0.5


def test_normalisation_is_per_patient() -> None:
    """A patient's normalised features do not depend on who else is in the batch (DP-SGD's per-patient view)."""
    x = torch.rand(6, IMAGE_DIM) * 5
    alone = _normalise(x[:1])
    assert torch.allclose(_normalise(x)[:1], alone)
    assert torch.allclose(alone.norm(dim=-1), torch.full((1,), FEATURE_NORM), atol=1e-4)
    assert torch.all(_normalise(torch.zeros(2, IMAGE_DIM)) == 0)  # a missing view or report stays zero


def test_opacus_per_sample_gradients_through_the_head() -> None:
    from opacus import GradSampleModule

    model = GradSampleModule(build_model(HEAD))
    batch = feature_batch(4)
    out = model(*batch[:6])
    out.llnm_logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4, name


def test_backbone_weights_are_pinned() -> None:
    import hashlib

    path = backbone_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BACKBONE_SHA256
    backbone = ImageBackbone()
    feats = backbone(torch.rand(3, 3, 64, 64))
    assert feats.shape == (3, IMAGE_DIM) and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize(("trainable", "expected"), [("heads", {"llnm_head", "stage_head"}),
                                                      ("heads-norms-biases", {"llnm_head", "stage_head", "norm"})])
def test_trainable_subsets_of_llnm_net(trainable: str, expected: set[str]) -> None:
    model = build_model(ModelConfig.preset("tiny", image_size=32, text_max_length=8))
    total = sum(p.numel() for p in model.parameters())
    n = restrict_trainable(model, trainable)  # type: ignore[arg-type]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert 0 < n < total / 5
    assert all(name.startswith(("llnm_head", "stage_head")) or "norm" in name or name.endswith(".bias")
               for name in names)
    if trainable == "heads":
        assert {name.split(".")[0] for name in names} == expected
    else:
        assert any(name.endswith(".bias") and not name.startswith(("llnm", "stage")) for name in names)
    with pytest.raises(ValueError, match=r"privacy\.patient\.trainable='everything'"):
        restrict_trainable(model, "everything")  # type: ignore[arg-type]


def test_dp_sgd_trains_only_the_restricted_subset(tmp_path: Path) -> None:
    """Opacus with a frozen body: only the heads move; the frozen parameters come back as they were sent."""
    import test_privacy as tp

    from fl_client.privacy import PatientDPSession
    from shared_model.model.training import TrainConfig, train_local, trainable_state

    data = tp.patient_tensors(16)
    model = build_model(tp.TINY)
    before = {k: v.clone() for k, v in trainable_state(model).items()}
    restrict_trainable(model, "heads")
    session = PatientDPSession.open(site_name="a", run_id="heads", settings=tp.settings_for(tmp_path),
                                    privacy_cfg=tp.privacy_cfg(), train_patient_ids=tp.ids(16), batch_size=8,
                                    local_epochs=1, total_rounds=1, server_round=1)
    cfg = TrainConfig(batch_size=8, local_epochs=1, seed=3, device="cpu", lr=1e-2)
    session.finish(train_local(model, data, cfg, hooks=session.hooks()))
    after = trainable_state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("llnm_head", "stage_head")) for k in moved), sorted(moved)


def test_feature_dataset_matches_the_models_batch_layout() -> None:
    from shared_model.sitedata.public_features import PublicFeatures

    b = feature_batch(3)
    feats = PublicFeatures("s", ["p1", "p2", "p3"], ["train", "test", "train"], *b)
    train = feats.subset("train")
    assert train.patient_ids == ["p1", "p3"]
    ds = make_dataset(train)
    assert len(ds) == 2 and [t.shape for t in ds[0]] == [t[0].shape for t in b]


def test_centring_uses_validation_patients_only() -> None:
    """The site's centring vector comes from its validation patients, so a training patient's centred inputs
    depend on that patient alone (what DP-SGD's per-patient analysis needs)."""
    from shared_model.sitedata.public_features import PublicFeatures

    b = feature_batch(6)
    splits = ["train", "train", "val", "val", "test", "train"]
    feats = PublicFeatures("s", [f"p{i}" for i in range(6)], splits, *b)
    centred = feats.centred("val")
    mean = b[0][2:4].mean(dim=(0, 1))
    assert torch.allclose(centred.image[0], b[0][0] - mean)
    assert centred.meta["centred_on"] == {"split": "val", "patients": 2}
    changed = [t.clone() for t in b]
    changed[0][1] += 5.0  # another training patient changes
    changed[2][1] -= 3.0
    again = PublicFeatures("s", feats.patient_ids, splits, *changed).centred("val")
    assert torch.equal(again.image[0], centred.image[0]) and torch.equal(again.text[0], centred.text[0])
    no_val = PublicFeatures("s", feats.patient_ids, ["train"] * 6, *b).centred("val")
    assert torch.equal(no_val.image, b[0]) and no_val.meta["centred_on"] is None


# ---- real site, real cache, real federation ------------------------------------------------------------
@pytest.mark.slow
def test_public_features_of_a_real_site_are_cached(small_consortium: Path, tmp_path: Path) -> None:
    from fl_server.config import load_config
    from shared_model.sitedata import public_features as pf

    exp = load_config(ROOT / "configs" / "demo.yaml")
    cache = tmp_path / "cache"
    site = small_consortium / "site-g"
    first = pf.site_public_features(site, exp.preprocess, cache_dir=cache)
    assert first.image.shape == (len(first), 2, IMAGE_DIM) and first.text.shape == (len(first), 1, 384)
    assert torch.all(first.image[first.view_mask == 0] == 0)  # a missing view has no features
    assert len(list(cache.glob("site-g-public-*.pt"))) == 1
    calls: list[int] = []
    original = pf.compute_public_features
    pf.compute_public_features = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[assignment]
    try:
        again = pf.site_public_features(site, exp.preprocess, cache_dir=cache)
    finally:
        pf.compute_public_features = original  # type: ignore[assignment]
    assert not calls and torch.equal(again.image, first.image) and again.patient_ids == first.patient_ids
    assert not any(p.name.startswith("site-g-public") for p in site.iterdir())  # nothing in the site folder


@pytest.mark.parametrize("name", ["demo-dp.yaml", "paper-dp.yaml"])
def test_dp_configs_use_the_measured_design(name: str) -> None:
    from fl_server.config import load_config

    exp = load_config(ROOT / "configs" / name)
    assert exp.architecture().architecture == "feature-head" and exp.architecture().feature_centring == "val"
    assert exp.privacy.patient.enabled and exp.privacy.patient.target_epsilon == 3.0
    assert exp.privacy.patient.delta == 1e-5 and exp.train.optimizer == "sgd"
