"""`fluid export` / `python -m jobs.export`: turn a training checkpoint, or a plain model, into an export.

    fluid export --checkpoint runs/fluid-adapt/checkpoint_000010 --output runs/export
    fluid export --from-model ~/models/my-llama --output runs/plain-export     # no training: AR speed

--checkpoint: reads the run configuration saved inside the checkpoint (`trainer_state.json`), rebuilds
the model (base model + `[M]` row, LoRA or the frozen-base drafter if it was used), loads the sharded DCP weights into it (DCP
re-shards, so a checkpoint written by N workers loads in one process).
--from-model: any model spec (a Hugging Face folder, a built-in name such as smollm2-135m, a .gguf
file, an fsspec URL) gets an untrained `[M]` row (the mean embedding). `fluid serve` and `fluid
generate` accept the result; its drafts are untrained, so `verify` is lossless but runs at AR speed
(the server says so) until the model is adapted with `fluid adapt`.
Both write `save_pretrained` safetensors + tokenizer + `fluid.json` to `--output` (atomically: temp
folder, then rename).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import run_job
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint",
                     help="checkpoint folder (e.g. runs/fluid-adapt/checkpoint_…); fsspec URLs are copied first")
    src.add_argument("--from-model", metavar="MODEL",
                     help="a plain model (HF folder, built-in name, .gguf, URL): export with untrained drafts")
    parser.add_argument("--output", required=True, help="where to write the Hugging Face export: a folder, or s3://… / gs://… (uploaded)")
    args = parser.parse_args(argv)
    if args.from_model:
        export_plain_model(args.from_model, args.output)
        print(f"[fluid] exported {args.from_model} → {args.output} (drafts untrained: `verify` runs at AR speed "
              "until the model is adapted)")
    else:
        export_checkpoint(args.checkpoint, args.output)
        print(f"[fluid] exported {args.checkpoint} → {args.output}")
    return 0


def export_plain_model(spec: str, output: str) -> str:
    """An export of an untrained model: its weights, an `[M]` row, fluid.json with steps_done 0."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.config import FluidConfig
    from pipeline.model.causal_lm import add_mask_token, load_causal_lm
    from pipeline.sources.model_source import resolve_model
    from pipeline.train.export import export_hf, export_meta
    from pipeline.train.outputs import export_to

    cfg = FluidConfig()
    cfg.model.spec = spec
    cfg.sampler.policy = "verify"  # lossless whatever the drafts are
    resolved = resolve_model(spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    model = load_causal_lm(resolved.path, dtype=torch.float32, use_safetensors=True)
    add_mask_token(model, resolved.mask_token_id)
    meta = export_meta(cfg, resolved.mask_token_id, resolved.meta.get("sha256"), 0)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    return export_to(str(output), lambda out: export_hf(model, tokenizer, out, fluid_meta=meta))


def export_checkpoint(checkpoint: str, output: str) -> str:
    import tempfile

    from pipeline.config import from_dict
    from pipeline.model.causal_lm import build_model
    from pipeline.sources.model_source import resolve_model
    from pipeline.train.checkpoint import load_model_weights, read_trainer_state
    from pipeline.train.export import export_meta

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(checkpoint)
        if "://" in checkpoint:
            import fsspec

            fs, root = fsspec.core.url_to_fs(checkpoint)
            fs.get(root.rstrip("/") + "/", tmp + "/", recursive=True)
            local = Path(tmp)
        if not local.is_dir():
            raise FluidError(f"checkpoint folder not found: {checkpoint}")
        state = read_trainer_state(local)
        cfg = from_dict(state["config"])
        resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
        import torch

        model = build_model(cfg, str(resolved.path), resolved.mask_token_id, torch.device("cpu"))  # + LoRA/drafter
        load_model_weights(local, model)
        from transformers import AutoTokenizer

        from pipeline.train.export import export_hf
        from pipeline.train.outputs import export_to

        meta = export_meta(cfg, resolved.mask_token_id, resolved.meta.get("sha256"), int(state["step"]))
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        return export_to(str(output), lambda out: export_hf(model, tokenizer, out, fluid_meta=meta,
                                                            base_dir=resolved.path))


if __name__ == "__main__":
    sys.exit(run_job(main))
