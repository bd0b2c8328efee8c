"""Evaluation and ablation: held-out CE by k, LAMBADA, the sampler table, reports, the `fluid evaluate` run.

No Ray import but in evaluate.py, which spreads LAMBADA items over Ray tasks."""
