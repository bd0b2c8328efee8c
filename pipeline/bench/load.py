"""The sharded-load benchmark (`python -m jobs.bench_load`): peak memory per rank while loading a model
for FSDP2 training, 1 vs N ranks, the whole model per rank vs each rank reading its own rows.

In:  a model size in GB (fp32; a random Llama saved as safetensors), rank counts and load modes
     (`full`: `build_model` then `fully_shard`; `sharded`: meta → `fully_shard` → own rows,
     pipeline/model/sharded_load.py), run in fresh processes (gloo, CPU).
Out: a printed table per (ranks, mode): peak RSS per rank, its growth over the start-up baseline,
     parameters per rank and seconds (`run`); `measure` returns the per-rank numbers.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import LOOPBACK_HOST


def make_model(folder: Path, gb: float) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 1536, 4096, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((gb * 1e9 / 4 - vocab * hidden) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=True,
                      max_position_embeddings=2048, eos_token_id=1, pad_token_id=1, bos_token_id=None)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB → GiB


def _rank(rank, world, port, folder, mode, out):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK_HOST}:{port}", rank=rank, world_size=world)
    import transformers  # noqa: F401  (imports count in the baseline, not the load)

    from pipeline.model import sharded_load  # noqa: F401

    base = _rss_gb()
    t0 = time.time()
    mask_id = 32000
    if mode == "full":
        from pipeline.model.causal_lm import add_mask_token, load_causal_lm
        from pipeline.model.parallelize import apply_fsdp2

        model = apply_fsdp2(add_mask_token(load_causal_lm(folder), mask_id), mixed_precision=False)
    else:
        model = sharded_load.load_sharded(folder, mask_id, torch.device("cpu"))
    local = sum(p.to_local().numel() for p in model.parameters())
    peak = _rss_gb()
    Path(f"{out}.{rank}").write_text(f"{peak:.3f} {base:.3f} {local} {time.time() - t0:.1f}")
    dist.barrier()
    dist.destroy_process_group()


def measure(folder: Path, world: int, mode: str) -> list[tuple[float, float, int, float]]:
    with socket.socket() as s:
        s.bind((LOOPBACK_HOST, 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r")
        mp.spawn(_rank, args=(world, port, str(folder), mode, out), nprocs=world, join=True)
        rows = [Path(f"{out}.{r}").read_text().split() for r in range(world)]
    return [(float(a), float(b), int(c), float(t)) for a, b, c, t in rows]


def run(gb: float, workers: list[int], modes: list[str], folder: str | None = None) -> int:
    """Write the random model (in a temporary folder under `folder`), then print a row per (ranks, mode)."""
    with tempfile.TemporaryDirectory(dir=folder) as d:
        model_dir = Path(d) / "model"
        t0 = time.time()
        n = make_model(model_dir, gb)
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9
        print(f"random Llama: {n / 1e6:.0f} M parameters, {size:.2f} GB safetensors ({time.time() - t0:.0f} s)")
        print(f"{'ranks':>5} {'load':>8} {'peak RSS/rank GiB':>18} {'over baseline':>14} {'params/rank':>12} {'s':>6}")
        for world in workers:
            for mode in modes:
                rows = measure(model_dir, world, mode)
                peak = max(r[0] for r in rows)
                growth = max(r[0] - r[1] for r in rows)
                print(f"{world:>5} {mode:>8} {peak:>18.2f} {growth:>14.2f} {max(r[2] for r in rows) / 1e6:>11.0f}M "
                      f"{max(r[3] for r in rows):>6.1f}", flush=True)
    return 0
