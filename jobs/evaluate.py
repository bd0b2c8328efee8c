"""`fluid evaluate --model EXPORT`: what adaptation bought and what it cost, as JSON, Markdown and plots.

Measures, on the export and its base model (`fluid.json` names it; `--base` overrides):
* held-out AR CE of both (test split of the export's corpus; no forgetting means a small change) and
  the draft CE by k = 1…K_max (the base model's `[M]` row is the untrained mean embedding);
* LAMBADA last-word accuracy (greedy) under `ar` and each policy of `eval.policies`, on the first
  `eval.lambada_items` of the 5 153 test items (the sample size is recorded in the report); items
  are spread over `eval.tasks` Ray tasks;
* the sampler table: tokens per forward, tokens/s and speed vs Hugging Face greedy `generate`
  (interleaved rounds in this run), agreement with AR greedy, NLL of the generations under the base
  model; and a `threshold` sweep over `eval.gammas` (speed vs agreement);
* with `eval.lambada_ce_tokens` > 0, the AR CE of both over that many LAMBADA tokens (whole passages:
  "no forgetting" outside the training domain).
* with `--tasks a,b` (the `harness` extra), those lm-evaluation-harness tasks on the export (model type
  `fluid`, pipeline/eval/harness.py); `lambada_openai` is ours over the cached LAMBADA file (offline), its
  count beside our own on the same items; and the accuracy-against-tokens-per-forward table
  (`lambada_openai_gen` under each of `eval.aup_policies`).
Writes report.json, report.md and PNG plots (CE by k before/after, training curves from the run's
metrics.jsonl, accepted-length histogram, speed vs agreement, the width of each forward) and horizon.html
(2–3 held-out prompts decoded with `verify`, the text coloured by the forward that committed it, the
widths under it) to `eval.output` (default: the folder `eval` next to the export).

Example:  fluid evaluate --model runs/fluid-adapt/export --eval.lambada_items=200
          fluid evaluate --model runs/fluid-adapt/export --tasks lambada_openai

`fluid evaluate --model SPEC --lambada-ce-only` measures only the LAMBADA AR CE (eval.lambada_ce_tokens,
50 000 when 0) of any model (an export: and of its base model) and writes lambada_ce.json (a record with
the command, commit, machine and date) to eval.output (default runs/eval).
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import parse_job_args, run_job
from pipeline.eval.evaluate import evaluate, lambada_ce_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder of fluid adapt (with fluid.json)")
    parser.add_argument("--base", default=None, help="base model spec (default: fluid.json's base_model)")
    parser.add_argument("--metrics", default=None, help="metrics.jsonl of the run (default: next to the export)")
    parser.add_argument("--lambada-ce-only", action="store_true",
                        help="only the AR CE over eval.lambada_ce_tokens LAMBADA tokens (default 50 000) of --model "
                             "(an export, a model folder or spec) and of an export's base model")
    parser.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (sets "
                        "eval.harness_tasks; lambada_openai and lambada_openai_gen run offline)")
    args, cfg = parse_job_args(parser, argv)
    if args.tasks:
        cfg.eval.harness_tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.lambada_ce_only:
        rec = lambada_ce_record(cfg, args.model, base_spec=args.base, argv=argv)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec["values"].items()))
        print(f"[fluid] LAMBADA AR CE record: {rec['path']}")
        return 0
    report = evaluate(cfg, args.model, base_spec=args.base, metrics_path=args.metrics)
    print(f"[fluid] evaluation report: {report['paths']['markdown']} (plots and report.json alongside)")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
