"""The `fluid` console script: one subcommand per job (each also runs as `python -m jobs.<name>`)."""

from __future__ import annotations

import importlib
import sys

from jobs.common import run_job

# subcommand → (module, one-line description)
COMMANDS = {
    "demo": ("jobs.demo", "the main job: data → adapt → horizon head → evaluate → serve, with a summary"),
    "info": ("jobs.info", "fetch/resolve the model and corpus of a config and describe them"),
    "preprocess": ("jobs.preprocess", "corpora → tokenized, packed, noised diffusion examples as Parquet shards"),
    "distill": ("jobs.distill", "self-distillation: the base model's greedy continuations of training prompts (Ray Data)"),
    "adapt": ("jobs.adapt", "Stage I causal-alignment adaptation on Ray Train (FSDP2, checkpoints, export)"),
    "fit-horizon": ("jobs.fit_horizon", "Stage II: fit the horizon head (K-head) of an export on Ray Train"),
    "generate": ("jobs.generate", "generate text from an export with the elastic-horizon sampler"),
    "ablate": ("jobs.ablate", "ablation: causal alignment vs bidirectional conversion vs random init"),
    "evaluate": ("jobs.evaluate", "held-out CE, LAMBADA and the sampler table of an export: JSON, Markdown, plots"),
    "bench": ("jobs.bench", "benchmarks: fluid bench data|sampler|serve|drafter-step|curve (one table style, one JSON schema)"),
    "export": ("jobs.export", "turn a training checkpoint into a Hugging Face folder with fluid.json"),
    "serve": ("jobs.serve", "serve an export behind an OpenAI-compatible endpoint on Ray Serve"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: fluid COMMAND [--config FILE.yaml] [--section.key=value …]\n\ncommands:")
        for name, (_, desc) in COMMANDS.items():
            print(f"  {name:<12}{desc}")
        print("\n`fluid COMMAND --help` explains each command.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} (known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_job(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
