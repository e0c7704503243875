"""The site's side of a segmentation round (`task: segment`): train the nodule and thyroid segmenter on the views
whose masks the site has drawn, and score the global segmenter on the drawn views of an evaluation split.

`fl_client.client_app` checks the site's policy first and then hands a segment message here. What leaves the site is
what leaves it in an LLNM-Net round: the segmenter's weights, and aggregate metrics. A train reply carries the views
that trained, the loss, steps and timing; a site with no drawn mask in its training split replies with the model
unchanged and zero views, which the coordinator does not aggregate. An evaluate reply carries sums over the scored
views (`shared_model.protocol.segmentation_metrics`): exact, or by default a Gaussian release charged to the site's
evaluation budget, as for LLNM-Net's score histograms (`fl_client.privacy.evaluation`). No mask, pixel or per-view
score is sent.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fl_client.settings import SiteSettings
from shared_model import protocol
from shared_model.config import PreprocessConfig, TrainConfig
from shared_model.model.segmenter import SegmenterConfig
from shared_model.protocol import segmentation_metrics

__all__ = ["evaluate_segmenter", "train_segmenter_round"]


def _round_segmenter(msg: Message) -> tuple[Any, SegmenterConfig, PreprocessConfig]:
    """The global segmenter of the message, its configuration and the round's preprocessing (cine frame)."""
    from shared_model.model.segmenter import build_segmenter

    config = msg.content[protocol.CONFIG_RECORD]
    seg_cfg = protocol.read_schema(config, protocol.SEGMENTER_CONFIG, SegmenterConfig)
    pre_cfg = protocol.read_schema(config, protocol.PREPROCESS_CONFIG, PreprocessConfig)
    model = build_segmenter(seg_cfg)
    model.load_state_dict(msg.content[protocol.ARRAYS_RECORD].to_torch_state_dict(), strict=True)
    return model, seg_cfg, pre_cfg


def train_segmenter_round(msg: Message, settings: SiteSettings, name: str, *, train_cfg: TrainConfig,
                          server_round: int, run_id: str, parts: int, run_seed: int,
                          site_record: Any) -> Message:
    """One round of local training on the training patients with a drawn mask (one part of them with rounds per
    pass); the reply holds the new weights and the train metrics."""
    from fl_client.privacy.history import data_id, patient_digests
    from fl_client.privacy.site_record import note_unprotected_round
    from shared_model.model.segmenter_training import train_segmenter
    from shared_model.model.training import round_part, trainable_state
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.segmentation_inputs import has_drawn_mask, load_segmentation_inputs

    started = time.perf_counter()
    model, seg_cfg, pre_cfg = _round_segmenter(msg)
    site = load_site(settings.data_path)
    patients = [p for p in site.patients if p.split == "train" and has_drawn_mask(p)]
    if parts > 1 and patients:
        # One permutation per pass, from the run's seed (the per-round seed would let parts overlap).
        patients = [patients[i] for i in round_part(len(patients), parts, server_round, run_seed, name)]
    inputs = load_segmentation_inputs(settings.data_path, seg_cfg.image_size, pre_cfg, site=site,
                                      seed=train_cfg.seed, patients=patients)
    result = train_segmenter(model, inputs.views, train_cfg)
    trained = sorted({v.patient_id for v in inputs.views if v.drawn.any()})
    if trained:
        # Recorded before the reply leaves: these patients are not protected by this run.
        note_unprotected_round(settings, name, run_id, server_round, len(trained),
                               data_id(patient_digests(trained)))
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        protocol.NUM_EXAMPLES: int(result.num_examples),
        protocol.UNIT_WEIGHT: 1,
        protocol.TRAIN_LOSS: float(result.loss),
        protocol.TRAIN_STEPS: int(result.steps),
        protocol.TRAIN_SECONDS: float(seconds),
        protocol.PATIENTS_PER_SECOND: float(len(trained) / result.seconds) if result.seconds > 0 else 0.0,
    }
    content = RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord(trainable_state(model)),
        protocol.METRICS_RECORD: MetricRecord(metrics),
        protocol.SITE_RECORD: site_record,
    })
    return Message(content, reply_to=msg)


def evaluate_segmenter(msg: Message, settings: SiteSettings, name: str, *, split: str, server_round: int,
                       run_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(the reply's metrics, extra site-record values): the global segmenter scored on the split's drawn views."""
    from shared_model.model.segmenter_training import predict_frames
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.segmentation_inputs import has_drawn_mask, load_segmentation_inputs, score_view

    extra: dict[str, str] = {}
    sigma = 0.0
    dp: dict[str, float] = {}
    if not settings.exact_evaluation:
        from fl_client.privacy.evaluation import reserve_releases

        # Charged before anything about the patients is computed, as for LLNM-Net's evaluate replies.
        sigma, _, dp = reserve_releases(settings, name, run_id, server_round, split, ["segmentation"])
    model, seg_cfg, pre_cfg = _round_segmenter(msg)
    site = load_site(settings.data_path)
    patients = [p for p in site.patients if p.split == split and has_drawn_mask(p)]
    inputs = load_segmentation_inputs(settings.data_path, seg_cfg.image_size, pre_cfg, site=site,
                                      patients=patients)
    views = [v for v in inputs.views if v.frame_masks]
    probabilities = predict_frames(model, views, device=settings.device) if views else []
    scores = [score_view(p, v) for p, v in zip(probabilities, views, strict=True)]
    if settings.exact_evaluation:
        from fl_client.privacy.site_record import note_exact_evaluation

        note_exact_evaluation(settings, name, run_id, server_round, split, len({v.patient_id for v in views}))
        return segmentation_metrics.encode(scores), extra
    from fl_client.privacy.evaluation import noisy_segmentation_sums

    noisy, noise_sd = noisy_segmentation_sums(scores, sigma)
    metrics = segmentation_metrics.encode([], sums=noisy, dp={"epsilon": dp["epsilon"],
                                                              "delta": settings.patient_delta, "sigma": noise_sd})
    extra[protocol.EVAL_WITHHELD] = ("differentially private reply: noisy sums over the scored views (no medians, no "
                                     "exact counts)")
    return metrics, extra
