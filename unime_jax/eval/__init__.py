"""Evaluation: dataset loaders (datasets), evaluators (evaluators) and exact metrics (metrics)."""
