"""The model side: loading with the `[M]` row and the two-stream forward (`causal_lm`), attention
masks, the Stage I loss, and sharding (`parallelize`). Plain PyTorch, no Ray."""
