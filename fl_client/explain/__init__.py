"""Explanations of the global model on a site's own patients.

Two uses, one set of computations:

* `llnm-site explain` (`fl_client.cmd_explain`) writes, for the site's own clinicians only, Grad-CAM++
  overlays on each patient's views (`gradcam`, with torchcam), the report segments and tokens that attention
  rollout ranks highest (`rollout`) and each patient's integrated-gradients feature-group shares
  (`attribution`, with captum);
* in a federation with `evaluation.explain: true`, the final evaluation makes the site return
  `site_explanation`'s aggregates only (`shared_model.evaluation.explanation`): the mean group shares and the location
  counts. Nothing per patient leaves the site.
"""

from fl_client.explain.aggregates import site_explanation

__all__ = ["site_explanation"]
