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

from jobs.common import run_job
from pipeline.train.export import export_checkpoint, export_plain_model


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


if __name__ == "__main__":
    sys.exit(run_job(main))
