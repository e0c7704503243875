"""Site-level DP at the coordinator and the run's privacy ledger ``runs/<name>/privacy.json``.

* `wrappers`: Flower's central-DP strategy wrappers for ``privacy.site``, tolerant of sites dropping out,
  with Flower's accountant when clipping is fixed (`wrap_with_site_dp`);
* `ledger`: `PrivacyLedger`, the run's record of both guarantees and the coordinator's privacy checks around
  each round (patient-level DP-SGD reported by every site, site-level releases, budget stops, resume);
* `replies`: what a site's train reply says about its privacy (DP-SGD metrics checked, refusals read);
* `guarantee`: what the ledger says the run guarantees, in plain sentences.

The coordinator never imports `fl_client`: the message keys both sides use come from `shared_model.protocol`.
"""

from __future__ import annotations

from fl_server.privacy.guarantee import guarantee_sentences
from fl_server.privacy.ledger import LEDGER_FORMAT, LEDGER_VERSION, PrivacyLedger, SiteBudgetExhausted
from fl_server.privacy.replies import EPS_RTOL
from fl_server.privacy.wrappers import (
    SERVER_ACCOUNTANT,
    SiteDPClientAdaptive,
    SiteDPClientFixed,
    SiteDPServerAdaptive,
    SiteDPServerFixed,
    flower_wrapper_name,
    wrap_with_site_dp,
)

__all__ = [
    "EPS_RTOL",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "SERVER_ACCOUNTANT",
    "PrivacyLedger",
    "SiteBudgetExhausted",
    "SiteDPClientAdaptive",
    "SiteDPClientFixed",
    "SiteDPServerAdaptive",
    "SiteDPServerFixed",
    "flower_wrapper_name",
    "guarantee_sentences",
    "wrap_with_site_dp",
]
