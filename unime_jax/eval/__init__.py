"""Evaluation: dataset loaders (datasets; MMEB-eval in mmeb), evaluators (evaluators), exact
metrics (metrics), the embedding cache (cache), report plots (plots) and the command line
(``python -m unime_jax.eval``, with tasks and report)."""
