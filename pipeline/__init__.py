"""FLUID on Ray: strictly causal AR-to-diffusion adaptation with elastic-horizon decoding.

The package reads top to bottom as the system does:

    config, errors, batch   one typed configuration; expected errors; the batch format (the contract)
    export_format           the export folder's file names and its versioned fluid.json (read, write, copy)
    sources/                what to read: corpora, models (by spec or fsspec URL)
    data/                   tokens → packed, noised two-stream examples (Ray Data in ray_pipeline only)
    model/                  the forward with `[M]`, attention masks, the loss, FSDP2 sharding
    train/                  Ray Train adaptation: loop, step, checkpoints, export
    decode/                 the elastic-horizon sampler, policies, KV cache, horizon head
    serve/                  Ray Serve: the OpenAI-compatible endpoint

The core (sources, data without Ray Data, model, decode) is plain PyTorch/NumPy with no Ray import;
Ray lives in the data, train and serve edges. Imports never run backwards in this list.
"""

__version__ = "0.1.0"
