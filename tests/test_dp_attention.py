"""The DP design that keeps LLNM-Net's bidirectional attention (`model.preset: dp-attention`): a narrow LLNM-Net
on frozen public tokens (EfficientNet-Lite0 feature-map cells per view, MiniLM segment states, scalar tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_server.config import ConfigError, load_config, parse_config
from shared_model import protocol
from shared_model.model.architectures import build_model
from shared_model.model.backbone import IMAGE_DIM, ImageBackbone
from shared_model.model.configuration import ModelConfig
from shared_model.model.layers import BidirectionalBlock
from shared_model.model.modeling import LLNMNet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo-dp-attention.yaml"


def token_batch(cfg: ModelConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """`n` patients in the public-token layout; patient 0 lacks its second view, patient 1 its report."""
    g = torch.Generator().manual_seed(seed)
    grid, length, c = cfg.image_size, 24, cfg.num_clinical
    view_mask, text_mask = torch.ones(n, 2), torch.ones(n, length)
    view_mask[0, 1] = 0
    text_mask[1] = 0
    text_mask[2:, 5:] = 0
    image = torch.randn(n, 2, IMAGE_DIM, grid, grid, generator=g) * view_mask[:, :, None, None, None]
    return (image, view_mask, torch.randn(n, length, cfg.text_dim, generator=g), text_mask,
            torch.randn(n, 2, c, generator=g), torch.ones(n, 2, c), torch.randint(0, 2, (n,), generator=g).float(),
            torch.full((n,), -1))


def test_the_shipped_config_is_llnm_net_with_its_bidirectional_attention_on_public_tokens() -> None:
    exp = load_config(CONFIG)
    cfg = exp.architecture()
    assert cfg.architecture == "llnm-net" and cfg.image_features == "public-tokens"
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels) == (2, 1, IMAGE_DIM)  # 4 tokens of 320 per view
    assert exp.preprocess.image_size == 64  # the maps the tokens are computed from keep their own size
    model = build_model(cfg)
    assert isinstance(model, LLNMNet) and len(model.bidirectional) == 1
    assert isinstance(model.bidirectional[0], BidirectionalBlock)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 17_649  # the count the config and docs/privacy.md give
    assert exp.privacy.patient.enabled and exp.privacy.patient.target_epsilon == 3.0
    assert exp.privacy.patient.trainable == "all"


def test_every_parameter_gets_a_per_patient_gradient_under_opacus() -> None:
    """Opacus' per-sample gradients exist for every parameter, with a missing view and a missing report in the
    batch (every parameter takes part in the loss, as DP-SGD needs)."""
    from opacus import GradSampleModule

    cfg = load_config(CONFIG).architecture()
    model = GradSampleModule(build_model(cfg))
    batch = token_batch(cfg, 4)
    out = model(*batch[:6])
    assert out.llnm_logits.shape == (4, 2) and out.stage_logits is None
    LLNMNet.patient_probability(out, batch[1]).sum().backward()
    missing = [name for name, p in model.named_parameters() if getattr(p, "grad_sample", None) is None]
    assert not missing, missing
    assert all(p.grad_sample.shape[0] == 4 for p in model.parameters())


def test_dp_sgd_trains_the_attention_design_and_accounts_it(tmp_path: Path) -> None:
    import test_privacy as tp
    from torch.utils.data import TensorDataset

    from fl_client.privacy import PatientDPSession
    from shared_model.model.training import TrainConfig, train_local, trainable_state

    cfg = load_config(CONFIG).architecture()
    data = TensorDataset(*token_batch(cfg, 24, seed=1))
    model = build_model(cfg)
    before = {k: v.clone() for k, v in trainable_state(model).items()}
    session = PatientDPSession.open(site_name="a", run_id="dp-attention", settings=tp.settings_for(tmp_path),
                                    privacy_cfg=tp.privacy_cfg(), train_patient_ids=tp.ids(24), batch_size=8,
                                    local_epochs=1, total_rounds=1, server_round=1)
    result = train_local(model, data, TrainConfig(batch_size=8, local_epochs=1, seed=3, device="cpu", lr=5e-3),
                         hooks=session.hooks())
    record = session.finish(result)
    after = trainable_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight")), "a weight did not move"
    assert record[protocol.DP_EPSILON] > 0 and record[protocol.DP_NOISE_MULTIPLIER] == pytest.approx(1.2)


def test_backbone_tokens_are_standardised_per_cell_and_per_image() -> None:
    backbone = ImageBackbone()
    maps = torch.rand(3, 3, 64, 64)
    tokens = backbone.tokens(maps, 2)
    assert tokens.shape == (3, IMAGE_DIM, 2, 2) and torch.isfinite(tokens).all()
    assert torch.allclose(tokens.mean(dim=1), torch.zeros(3, 2, 2), atol=1e-4)
    assert torch.allclose(tokens.pow(2).mean(dim=1), torch.ones(3, 2, 2), atol=1e-3)
    assert torch.allclose(backbone.tokens(maps[:1], 2), tokens[:1], atol=1e-5)  # one image's tokens are its own


def test_public_tokens_of_a_real_site_are_cached_apart_from_the_pooled_features(small_consortium: Path,
                                                                              tmp_path: Path) -> None:
    from shared_model.sitedata import public_features as pf
    from shared_model.sitedata.model_inputs import load_site_inputs, make_dataset

    exp = load_config(CONFIG)
    cache = tmp_path / "cache"
    site = small_consortium / "site-g"
    feats = load_site_inputs(site, exp.preprocess, exp.architecture(), cache_dir=cache)
    n = len(feats)
    assert feats.image.shape == (n, 2, IMAGE_DIM, 2, 2) and feats.text.shape[0] == n and feats.text.shape[2] == 384
    assert feats.text_mask.shape == feats.text.shape[:2]
    assert torch.all(feats.image[feats.view_mask == 0] == 0)
    pooled = pf.site_public_features(site, exp.preprocess, cache_dir=cache)
    assert pooled.image.shape == (n, 2, IMAGE_DIM)
    assert len(list(cache.glob("site-g-public-*.pt"))) == 2  # one file each, neither read for the other
    model = build_model(exp.architecture()).eval()
    batch = make_dataset(feats.subset("test"))[0]
    out = model(*(t.unsqueeze(0) for t in batch[:6]))
    assert torch.isfinite(out.llnm_logits).all()
    assert not any(p.name.startswith("site-g-public") for p in site.iterdir())


def test_explanations_are_refused_for_the_public_token_model() -> None:
    data = load_config(CONFIG).model_dump(mode="json")
    data["evaluation"] = {"explain": True}
    with pytest.raises(ConfigError, match="explanations need the LLNM-Net transformer on the image feature maps"):
        parse_config(data)
    with pytest.raises(ValueError, match="needs architecture llnm-net and patch_size 1"):
        ModelConfig.preset("dp-attention", patch_size=2)
