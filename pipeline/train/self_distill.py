"""Self-distillation by Ray Data batch inference (`fluid distill`): the base model's greedy continuations.

In:  a `FluidConfig` (`distill.*`: output folder or URL, prompt and continuation lengths, count, shard
     size, actors; the model and the corpus's training split). Out: `distill(cfg)` → the summary
     (counts, timing; also `summary.json`), with one Parquet shard per `distill.shard_size` prompts
     (`prompt_ids`, `continuation_ids`, `text`; pipeline/data/distill.py) under `distill.output`.
     Existing shards are skipped, so an interrupted run resumes; `distill.json` records the settings.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pipeline.config import FluidConfig
from pipeline.errors import FluidError


class Distiller:
    """Ray Data actor: holds the model, turns a batch of shards into written Parquet files + counts."""

    def __init__(self, spec: str, cache_dir, mask_token: str, output: str, new_tokens: int, batch_size: int,
                 threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        from pipeline.model.causal_lm import load_causal_lm
        from pipeline.sources.model_source import resolve_model

        if threads:
            torch.set_num_threads(threads)
        resolved = resolve_model(spec, cache_dir, mask_token=mask_token)  # each node fetches into its own cache
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_causal_lm(resolved.path, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        gen_eos = self.model.generation_config.eos_token_id
        eos = {self.tokenizer.eos_token_id} | set([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
        self.eos = {e for e in eos if e is not None}
        self.pad = self.tokenizer.pad_token_id
        self.output, self.new_tokens, self.batch_size = output, new_tokens, batch_size

    def __call__(self, batch: dict) -> dict:
        from pipeline.data.distill import greedy_continue, write_shard

        out = {"shard": [], "prompts": [], "tokens": [], "eos": [], "seconds": [], "cpu_seconds": []}
        for shard, flat, plen in zip(batch["shard"], batch["prompts"], batch["prompt_len"], strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            prompts = np.asarray(flat).reshape(-1, int(plen))
            conts = []
            for i in range(0, len(prompts), self.batch_size):
                conts += greedy_continue(self.model, prompts[i:i + self.batch_size], self.new_tokens,
                                         eos_ids=self.eos, pad_id=self.pad)
            texts = [self.tokenizer.decode(list(p) + c) for p, c in zip(prompts.tolist(), conts, strict=True)]
            tokens = write_shard(self.output, int(shard), prompts, conts, texts)
            out["shard"].append(int(shard))
            out["prompts"].append(len(prompts))
            out["tokens"].append(tokens)
            out["eos"].append(sum(bool(c) and c[-1] in self.eos for c in conts))
            out["seconds"].append(time.perf_counter() - t0)
            out["cpu_seconds"].append(time.process_time() - c0)  # all threads: the cost on a busy machine
        return {k: np.asarray(v) for k, v in out.items()}


def validate(cfg: FluidConfig) -> None:
    d = cfg.distill
    if not d.output:
        raise FluidError("set distill.output (a folder or fsspec URL for the distilled corpus)")
    for name in ("prompt_len", "new_tokens", "count", "shard_size", "batch_size", "actors"):
        if getattr(d, name) < 1:
            raise FluidError(f"distill.{name} must be ≥ 1, got {getattr(d, name)}")


def distill(cfg: FluidConfig, *, ray_address: str | None = None, local: bool = False) -> dict:
    """Run (or resume) the distillation; returns the summary (also written to `summary.json`)."""
    import ray

    from pipeline.data.distill import check_manifest, done_shards, select_prompts
    from pipeline.data.ray_pipeline import init_ray
    from pipeline.sources.model_source import resolve_model

    d = cfg.distill
    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    settings = {"model": cfg.model.spec, "model_sha256": resolved.meta.get("sha256"), "corpus": cfg.data.corpus,
                "prompt_len": d.prompt_len, "new_tokens": d.new_tokens, "count": d.count,
                "shard_size": d.shard_size, "seed": d.seed, "split_seed": cfg.data.split_seed}
    check_manifest(d.output, settings)
    prompts = select_prompts(cfg.data, tokenizer_path=resolved.path, prompt_len=d.prompt_len, count=d.count,
                             seed=d.seed, cache_dir=cfg.model.cache_dir)
    n_shards = -(-d.count // d.shard_size)
    done = done_shards(d.output)
    todo = [s for s in range(n_shards) if s not in done]
    print(f"[fluid] distill: {d.count} prompts in {n_shards} shards; {len(done)} done, {len(todo)} to go "
          f"→ {d.output}", flush=True)
    t0 = time.perf_counter()
    rows = []
    old = _read_summary(d.output)
    kwargs = dict(spec=cfg.model.spec, cache_dir=cfg.model.cache_dir, mask_token=cfg.model.mask_token,
                  output=d.output, new_tokens=d.new_tokens, batch_size=d.batch_size)
    items = [{"shard": s, "prompts": prompts[s * d.shard_size:(s + 1) * d.shard_size].reshape(-1),
              "prompt_len": d.prompt_len} for s in todo]

    def progress(row):
        rows.append(row)
        tokens = sum(int(r["tokens"]) for r in rows)
        print(f"[fluid] distill: shard {int(row['shard'])} done ({len(rows)}/{len(todo)}), "
              f"{tokens} tokens, {tokens / (time.perf_counter() - t0):.1f} tokens/s", flush=True)
        _write_summary(d.output, _totals(old, rows, time.perf_counter() - t0, n_shards))  # an interrupted run keeps them

    if todo and local:
        model = Distiller(**kwargs, threads=d.cpus_per_actor)
        for item in items:
            out = model({k: [v] for k, v in item.items()})
            progress({k: v[0] for k, v in out.items()})
    elif todo:
        init_ray(**({"address": ray_address} if ray_address else
                    {"num_cpus": max(4, d.actors * d.cpus_per_actor), "include_dashboard": False}))
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            Distiller, batch_size=1, batch_format="numpy", num_gpus=gpus, num_cpus=d.cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=d.actors),
            fn_constructor_kwargs=dict(**kwargs, threads=None if gpus else d.cpus_per_actor))
        ds.context.enable_progress_bars = False
        for row in ds.iter_rows():
            progress(row)
    summary = _totals(old, rows, time.perf_counter() - t0, n_shards)
    _write_summary(d.output, summary)
    return summary


def _read_summary(output: str) -> dict:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{output.rstrip('/')}/summary.json")
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def _write_summary(output: str, summary: dict) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{output.rstrip('/')}/summary.json")
    fs.pipe_file(path, json.dumps(summary, indent=2).encode())


def _totals(old: dict, rows: list[dict], seconds: float, n_shards: int) -> dict:
    """Totals over every sitting: the summary found at the start plus this sitting's shards (a shard written
    again after its file was lost counts again: these are costs, not the corpus size)."""
    keys = ("prompts", "tokens", "eos")
    s = {k: int(old.get(k, 0)) + sum(int(r[k]) for r in rows) for k in keys}
    s["generate_seconds"] = float(old.get("generate_seconds", 0.0)) + sum(float(r["seconds"]) for r in rows)
    s["generate_cpu_seconds"] = float(old.get("generate_cpu_seconds", 0.0)) + sum(float(r["cpu_seconds"]) for r in rows)
    s["wall_seconds"] = float(old.get("wall_seconds", 0.0)) + seconds
    s["shards_written"] = int(old.get("shards_written", 0)) + len(rows)
    s["shards"] = n_shards
    s["tokens_per_generate_second"] = s["tokens"] / s["generate_seconds"] if s["generate_seconds"] else 0.0
    return s

