"""Ray Train adaptation: the worker loop (`loop`), one step and evaluation (`step`, no Ray), the
optimizer, metrics, sharded checkpoints and the Hugging Face export (`export`, no Ray)."""
