"""Evaluation, role-free: binary metrics with intervals, curves and score histograms that pool exactly
(`metrics`), the risk-stage metrics (`stage`), and what a site's explanation aggregates are and how the
coordinator combines them (`explanation`)."""
