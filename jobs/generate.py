"""`fluid generate`: generate text with the elastic-horizon sampler and print the statistics.

`--model` is an export folder of `fluid adapt` (fluid.json: mask id, K_max, policy defaults, and
the horizon head if fitted) or any model spec of pipeline/sources/model_source.py (e.g. the built-in
`smollm2-135m`), whose mask token is then untrained — useful to check the never-slower-than-AR
fallback. Sampler settings come from `--policy/--gamma/…` or the `sampler` config section.

`--show` colours the text by the forward that committed it: each colour (or, when stdout is not a
terminal or NO_COLOR is set, each `|`-separated piece) is the tokens one forward of the model added.

Example:  fluid generate --model runs/fluid-adapt/export --policy verify --prompt "To be, or not" --show
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.common import parse_job_args, run_job
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="export folder or model spec (default: model.spec)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--policy", choices=["ar", "fixed", "threshold", "entropy", "khead", "verify"])
    parser.add_argument("--gamma", type=float, help="confidence gate (fixed/threshold/khead) or entropy budget")
    parser.add_argument("--max-horizon", type=int, help="largest horizon K (clamped to the model's K_max)")
    parser.add_argument("--max-tokens", type=int, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--show", action="store_true",
                        help="colour the text by the forward that committed it (`|` between forwards when stdout "
                             "is not a terminal or NO_COLOR is set)")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.decode.sampler import GenerationRequest

    s = cfg.sampler
    from pipeline.decode.dtype import inference_dtype
    from pipeline.decode.load import load_sampler

    spec = args.model or cfg.model.spec
    sampler = load_sampler(spec, cache_dir=cfg.model.cache_dir, k_max=cfg.noise.k_max, forward_cost=s.forward_cost,
                           dtype=inference_dtype(s.dtype, "cpu", spec), matmul=s.matmul)
    prompts = args.prompt
    if args.chat:
        if not getattr(sampler.tokenizer, "chat_template", None):
            raise FluidError("--chat: this tokenizer has no chat template")
        prompts = [sampler.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                         add_generation_prompt=True) for p in prompts]
    requests = [GenerationRequest(
        prompt=p, max_tokens=args.max_tokens or s.max_tokens, policy=args.policy or s.policy,
        gamma=s.gamma if args.gamma is None else args.gamma, max_horizon=args.max_horizon or s.max_horizon,
        temperature=s.temperature if args.temperature is None else args.temperature,
        top_p=s.top_p if args.top_p is None else args.top_p, seed=args.seed, stop=args.stop) for p in prompts]
    t0 = time.perf_counter()
    results = sampler.generate(requests)
    wall = time.perf_counter() - t0
    batched = len(results) > 1  # rows share every forward: only the batch has a wall time of its own
    for prompt, result in zip(args.prompt, results, strict=True):
        st = result.stats
        hist = " ".join(f"{k}:{v}" for k, v in sorted(st.accepted_hist.items()))
        timing = "" if batched else (f", {st.wall_time_s:.2f} s ({st.tokens / max(st.wall_time_s, 1e-9):.1f} "
                                     "tokens/s)")
        text = show(sampler, result) if args.show else result.text
        print(f"--- prompt: {prompt!r}\n{text}\n--- {st.policy}: {st.tokens} tokens in {st.forwards} forwards "
              f"({st.tokens_per_forward:.2f} tokens/forward){timing}, finish {result.finish_reason}; "
              f"accepted per forward {hist}")
    if batched:
        tokens = sum(r.stats.tokens for r in results)
        print(f"--- batch of {len(results)} prompts decoded together: {tokens} tokens in {wall:.2f} s "
              f"({tokens / max(wall, 1e-9):.1f} tokens/s in all)")
    return 0


def show(sampler, result) -> str:
    """The text with each forward's chunk in its own colour, or `|` between them (pipeline/decode/show.py)."""
    from pipeline.decode.show import render, step_chunks, use_colour

    chunks = step_chunks(sampler.decode, result.token_ids, result.stats.step_of_token, result.text)
    return render(chunks, colour=use_colour(sys.stdout))


if __name__ == "__main__":
    sys.exit(run_job(main))
