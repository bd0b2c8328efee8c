"""Evaluation and ablation metrics (no Ray import): held-out CE by k, LAMBADA, the sampler table."""
