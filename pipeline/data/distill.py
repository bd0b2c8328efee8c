"""Self-distillation core (docs/method.md §12): prompts cut from the training
split, the base model's batched greedy continuations, and the Parquet shards that hold them. No Ray.

In:  a `DataConfig` and a resolved tokenizer folder (prompts); a causal LM and [B, P] prompt ids
     (continuations); an fsspec path (shards).
Out: * `select_prompts` — `count` prompts of `prompt_len` tokens, cut from the training split only
       (windows inside one document, no EOS), chosen by a seeded hash of their global window index:
       the same settings give the same prompts on any machine.
     * `greedy_continue` — each prompt's greedy continuation of `new_tokens` tokens (HF `generate`,
       KV cache, all prompts of a batch have the same length so no padding enters the forward), cut
       after the first EOS (kept: the clean stream may contain it).
     * `shard_path` / `write_shard` / `read_distilled` — one Parquet file per shard
       (`prompt_ids`, `continuation_ids`: list<int32>; `text`: the decoded prompt + continuation),
       written atomically (temp name, then rename) so a shard either exists whole or not at all:
       that is what makes `fluid distill` resumable by shard.
"""

from __future__ import annotations

import json
import uuid

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.packing import shuffle_keys
from pipeline.errors import FluidError

MANIFEST = "distill.json"


def windows(stream: np.ndarray, prompt_len: int, eos_id: int) -> np.ndarray:
    """Non-overlapping windows [n, prompt_len] of a token stream that contain no EOS."""
    rows = stream[: len(stream) // prompt_len * prompt_len].reshape(-1, prompt_len)
    return rows[~(rows == eos_id).any(axis=1)]


def select_prompts(data_cfg: DataConfig, *, tokenizer_path, prompt_len: int, count: int, seed: int = 0,
                   cache_dir=None) -> np.ndarray:
    """[count, prompt_len] int32 prompts from the training split (module docstring)."""
    from pipeline.data.local import file_units, load_fast_tokenizer, plan_sources, special_ids, tokenize_units
    from pipeline.sources.corpus import RecordStats

    if prompt_len < 1 or count < 1:
        raise FluidError(f"distill.prompt_len and distill.count must be ≥ 1, got {prompt_len} and {count}")
    eos_id, _ = special_ids(tokenizer_path)
    tokenizer = load_fast_tokenizer(tokenizer_path)
    parts = []
    for item in plan_sources(data_cfg, "train", cache_dir=cache_dir):
        units = [texts for _, texts in file_units(item, split="train", data_cfg=data_cfg, unit_chars=1 << 20,
                                                  stats=RecordStats())]
        parts += [windows(stream, prompt_len, eos_id) for stream, _ in tokenize_units(tokenizer, units, eos_id)]
    allw = np.concatenate(parts) if parts else np.zeros((0, prompt_len), dtype=np.int32)
    if allw.shape[0] < count:
        raise FluidError(f"the training split has only {allw.shape[0]} prompts of {prompt_len} tokens; "
                         f"lower distill.count ({count}) or distill.prompt_len")
    order = np.argsort(shuffle_keys(np.arange(allw.shape[0], dtype=np.int64), seed, 0), kind="stable")
    return allw[np.sort(order[:count])].astype(np.int32)


def greedy_continue(model, prompts, new_tokens: int, *, eos_ids, pad_id: int | None = None) -> list[list[int]]:
    """Greedy continuations (lists of ids, cut after the first EOS) of equal-length prompts [B, P]."""
    import torch
    from transformers import GenerationConfig

    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=next(model.parameters()).device)
    eos = sorted({int(e) for e in eos_ids}) or None
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                           pad_token_id=pad_id if pad_id is not None else (eos[0] if eos else 0))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if eos and t in eos), len(row))
        result.append(row[:cut])
    return result


def shard_path(root: str, shard: int) -> str:
    return f"{root.rstrip('/')}/shard-{shard:05d}.parquet"


def write_shard(root: str, shard: int, prompts, continuations: list[list[int]], texts: list[str]) -> int:
    """Write one shard atomically; returns the number of continuation tokens."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt_ids": pa.array([list(map(int, p)) for p in prompts], type=pa.list_(pa.int32())),
        "continuation_ids": pa.array(continuations, type=pa.list_(pa.int32())),
        "text": pa.array(texts, type=pa.string()),
    })
    fs, path = fsspec.core.url_to_fs(shard_path(root, shard))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)
    return sum(len(c) for c in continuations)


def done_shards(root: str) -> set[int]:
    """Shard numbers already written under `root`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        return set()
    names = [f.rsplit("/", 1)[-1] for f in fs.ls(path, detail=False)]
    return {int(n[6:11]) for n in names if n.startswith("shard-") and n.endswith(".parquet")}


def check_manifest(root: str, settings: dict) -> None:
    """Write `distill.json` (the settings) or, on resume, refuse settings that differ from it."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{MANIFEST}")
    if fs.exists(path):
        old = json.loads(fs.cat_file(path))
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise FluidError(f"{root} holds a distilled corpus made with other settings ({', '.join(diff)}); "
                             "use another output path")
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(settings, indent=2).encode())


def read_distilled(root: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(prompts, continuations) of every shard under `root`, in shard order."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(root)
    shards = sorted(done_shards(root))
    if not shards:
        raise FluidError(f"no distilled shards under {root}; run `fluid distill --distill.output={root}` first")
    prompts, conts = [], []
    for s in shards:
        with fs.open(shard_path(path, s), "rb") as f:
            t = pq.read_table(f, columns=["prompt_ids", "continuation_ids"]).to_pydict()
        prompts += [np.asarray(p, dtype=np.int32) for p in t["prompt_ids"]]
        conts += [np.asarray(c, dtype=np.int32) for c in t["continuation_ids"]]
    return prompts, conts
