"""Importers of public thyroid data sets into site folders of the data contract (`llnm-site import`).

Each importer reads a public data set where it lies (never writing there), expresses every record it can in
the contract (docs/site-data.md), counts and reports the records it cannot, and splits the patients into K
simulated hospitals (`fl_research.importers.common.write_sites`): patient-disjoint, seeded, and recorded in each
site's `site.yaml`.
"""

from fl_research.importers.common import ImportResult, SitePatient, write_sites

__all__ = ["ImportResult", "SitePatient", "write_sites"]
