"""The demo's draft-target recipes (`demo.drafts`, docs/method.md §12): natural text, the base model's
own greedy continuations mixed in (self_distill), and a frozen base with a drafter (frozen_base)."""

from __future__ import annotations

from pathlib import Path


def recipe_natural(cfg, out: Path, log) -> list[str]:
    """Draft targets are the corpus text itself: no extra data."""
    return []


def _distill_for_demo(cfg, out: Path, log) -> str:
    """`fluid distill` into <out>/distilled (in this process: the demo's Ray instance runs the rest)."""
    import dataclasses

    from pipeline.train.self_distill import distill

    folder = out / "distilled"
    d = cfg.distill
    # sized for the demo: prompt + continuation = one clean stream; a few minutes on 2 CPU cores
    prompt_len = min(d.prompt_len, max(1, cfg.data.seq_len // 4))
    settings = dataclasses.replace(d, output=str(folder), prompt_len=prompt_len,
                                   new_tokens=cfg.data.seq_len - prompt_len,
                                   count=min(d.count, DEMO_DISTILL_PROMPTS), shard_size=min(d.shard_size, 32))
    log(f"[fluid] distilling {settings.count} greedy continuations of {settings.new_tokens} tokens into {folder}")
    distill(dataclasses.replace(cfg, distill=settings), local=True)
    return str(folder)


def recipe_self_distill(cfg, out: Path, log) -> list[str]:
    """The base model's own greedy continuations as draft targets, half of the rows; natural text in the rest."""
    return [f"--data.distilled={_distill_for_demo(cfg, out, log)}", "--data.distill_mix=0.5"]


# The drafter's adapter on q, o, gate and down only: at equal CPU time it drafted as well as one on all
# seven projections (BENCHMARKS.md, "Draft recipes at equal compute") with 120 instead of 210 adapted modules, and
# each adapted module adds small matrix products to every decoding step that carries masks. No
# restoration noise: decoding never reveals a draft position.
DRAFTER_ARGS = ["--train.drafter=adapter", "--train.lora_rank=32", "--train.lora_alpha=64", "--train.lr=1e-3",
                "--train.lora_targets=[q_proj,o_proj,gate_proj,down_proj]", "--noise.rho=0"]


def recipe_frozen_base(cfg, out: Path, log) -> list[str]:
    """Frozen base + a drafter (gated LoRA on draft tokens) trained on the model's own greedy continuations."""
    return [f"--data.distilled={_distill_for_demo(cfg, out, log)}", "--data.distill_mix=1.0", *DRAFTER_ARGS]


# demo.drafts → a function (cfg, output folder, log) → extra `fluid adapt` overrides. Recipes that
# produce their own data (self-distillation) write it under the output folder and point adapt at it.
RECIPES = {"natural": recipe_natural, "self_distill": recipe_self_distill, "frozen_base": recipe_frozen_base}
DEMO_DISTILL_PROMPTS = 64  # ~2 minutes of batched greedy generation on 2 cores (~50 tokens/s)
