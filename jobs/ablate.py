"""`fluid ablate` / `python -m jobs.ablate`: causal alignment vs bidirectional conversion vs random init.

From the same base model and the same text, three arms train for `ablate.tokens` corpus tokens each:
(a) `causal` — FLUID strictly causal alignment; (b) `bidirectional` — masked diffusion with
DiffuLLaMA attention-mask annealing; (c) `scratch` — causal alignment from a random init. One metric
for all: the held-out CE of predicting x_{c+k} from x≤c (k = 1…ablate.horizon), each model under its
own attention and mask layout, evaluated along training. Writes a table (ablate.md), a plot
(ablate.png) and the curves (ablate.json) to `ablate.output`; finished arms are reused on re-runs.

The default size (48 k tokens per arm, SmolLM2-135M, seq_len 128) takes about 45 minutes on 2 quiet
CPU cores; a larger run is a config change, e.g. --ablate.tokens=1000000 --ablate.seq_len=256.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import parse_job_args, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args, cfg = parse_job_args(parser, argv)
    import torch

    from pipeline.eval.ablate import run_ablation
    from pipeline.sources.model_source import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    result = run_ablation(cfg, resolved, log=lambda m: print(m, flush=True))
    print((__import__("pathlib").Path(cfg.ablate.output) / "ablate.md").read_text())
    print(f"[fluid] ablation written to {cfg.ablate.output}/ (ablate.md, ablate.png, ablate.json); "
          f"arms: {', '.join(result['arms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
