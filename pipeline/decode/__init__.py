"""Decoding: the elastic-horizon sampler with its exact KV cache, the policies, the horizon head
(K-head) and its Stage II fitting, and one loader for exports (`load`). Plain PyTorch, no Ray."""
