"""`fluid distill` (Ray Data actor pool, resumable by shard) and `adapt` on its output with the frozen-base
drafter; `adapt` with `train.lora_rank > 0` (peft LoRA, merged at export)."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import FluidError
from tests.train.test_train import _corpus, _run, tiny_resolved  # noqa: F401 (fixture)

pytestmark = pytest.mark.ray


def _distill_cfg(tmp_path, resolved, corpus, *extra):
    return load_config(None, [f"--model.spec={resolved.path}", f"--data.corpus={corpus}", "--data.val_fraction=0.2",
                              "--data.test_fraction=0.1", f"--distill.output={tmp_path / 'distilled'}",
                              "--distill.prompt_len=4", "--distill.new_tokens=12", "--distill.count=6",
                              "--distill.shard_size=2", "--distill.batch_size=4", "--distill.cpus_per_actor=1",
                              *extra])


def test_distill_matches_hf_generate_resumes_by_shard_and_trains_the_frozen_drafter(ray_local, tmp_path,
                                                                                     tiny_resolved):  # noqa: F811
    from pipeline.data.distill import read_distilled, shard_path
    from pipeline.model.causal_lm import load_causal_lm
    from pipeline.train.self_distill import distill

    corpus = _corpus(tmp_path / "corpus")
    summary = distill(_distill_cfg(tmp_path, tiny_resolved, corpus))
    assert summary["prompts"] == 6 and summary["shards_written"] == 3 and summary["tokens"] > 0
    prompts, conts = read_distilled(str(tmp_path / "distilled"))
    base = load_causal_lm(tiny_resolved.path)
    for p, c in zip(prompts, conts, strict=True):  # each continuation is HF greedy generate of its prompt
        ids = torch.as_tensor(p, dtype=torch.long)[None]
        ref = base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            eos_token_id=1, pad_token_id=1)[0, 4:].tolist()
        assert c.tolist() == (ref[: ref.index(1) + 1] if 1 in ref else ref)

    shard1 = tmp_path / "distilled" / "shard-00001.parquet"
    before = shard1.read_bytes()
    shard1.unlink()
    again = distill(_distill_cfg(tmp_path, tiny_resolved, corpus))
    assert again["shards_written"] == 4 and again["prompts"] == 8  # totals over sittings: one shard redone
    assert shard1.read_bytes() == before and shard_path(str(tmp_path / "distilled"), 1).endswith("00001.parquet")
    with pytest.raises(FluidError, match="new_tokens"):
        distill(_distill_cfg(tmp_path, tiny_resolved, corpus, "--distill.new_tokens=8"))

    weights, metrics, result = _run(tmp_path, "drafter", tiny_resolved, corpus, "--train.drafter=adapter",
                                    "--train.lora_rank=4", f"--data.distilled={tmp_path / 'distilled'}",
                                    "--data.distill_mix=0.5", "--train.max_steps=3")
    # the training shards adapt wrote hold the mix row by row: half of every prefix distilled (±1)
    from pipeline.data.streaming import ShardReader, list_blocks

    blocks = list_blocks(str(tmp_path / "runs" / "drafter" / "data" / "train"))
    reader = ShardReader(blocks, micro_global=4, rank=0, world=1, shuffle=False, columns=["input_ids"])
    rows = np.concatenate([reader._block(b)["input_ids"] for b in range(len(blocks))])
    starts = {tuple(p[:4].tolist()) for p in prompts}
    flags = [tuple(r[:4].tolist()) in starts for r in rows]
    assert len(rows) > 8 and all(abs(sum(flags[:n]) - n / 2) <= 1 for n in range(1, len(flags) + 1))
    export = result["export"]
    assert open(f"{export}/model.safetensors", "rb").read() == (tiny_resolved.path / "model.safetensors").read_bytes()
    meta = json.loads(open(f"{export}/fluid.json").read())
    assert meta["drafter"]["kind"] == "gated_lora" and meta["drafter"]["rank"] == 4
    evals = [m for m in metrics if m.get("event") == "eval"]
    assert abs(evals[0]["val_ar_ce"] - evals[-1]["val_ar_ce"]) < 1e-5  # AR untouched by construction
    assert evals[-1]["val_draft_ce"] < evals[0]["val_draft_ce"]  # the drafts did learn

    from pipeline.decode.load import load_sampler
    from pipeline.decode.sampler import GenerationRequest

    sampler = load_sampler(export)
    res = sampler.generate(GenerationRequest(prompt_ids=prompts[0].tolist(), max_tokens=12, policy="verify"))
    assert res[0].token_ids == [t for t in conts[0].tolist() if t != 1][: len(res[0].token_ids)]


def test_adapt_with_lora_rank(ray_local, tmp_path, tiny_resolved):  # noqa: F811
    weights, metrics, result = _run(tmp_path, "lora", tiny_resolved, _corpus(tmp_path / "corpus"),
                                    "--train.lora_rank=2", "--train.lora_alpha=4", "--train.max_steps=2",
                                    "--train.lora_targets=[q_proj, v_proj]")
    assert [m["step"] for m in metrics if "event" not in m] == [1, 2]
    assert not any("lora" in k for k in weights)  # merged into the base weights at export
    from tests.conftest import make_tiny_llama

    ref = make_tiny_llama(tiny_resolved.mask_token_id).state_dict()
    changed = lambda k: not torch.allclose(weights[k], ref[k][: weights[k].shape[0]])  # noqa: E731
    assert changed("model.layers.0.self_attn.q_proj.weight")
    assert not changed("model.layers.0.mlp.up_proj.weight")  # not a target
