"""FLUID on Ray: strictly causal AR-to-diffusion adaptation with elastic-horizon decoding.

The core (noise, attention masks, losses, sampler) is plain PyTorch/NumPy with no Ray import;
Ray lives in the data, train and serve edges.
"""

__version__ = "0.1.0"
