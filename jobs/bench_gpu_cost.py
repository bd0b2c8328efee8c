"""Forward cost by width on this device, and the cost-aware `verify` horizon it leads to.

    python -m jobs.bench_gpu_cost                      # CUDA if present: SmolLM2-135M shape, bf16
    python -m jobs.bench_gpu_cost --device cpu --tiny  # a small shape, to check the script on a CPU

No download: the model is randomly initialised with the SmolLM2-135M shape (plus the [M] row); its
timing is what matters here. Three tables (one run, a few minutes at most on a GPU):
1. forward cost by width 1…32 (and 48, 64) with a KV cache of --past tokens (median of interleaved rounds),
   relative to a 1-token AR step — what `cost_model.calibrate` measures at load;
2. the horizon K (and layout: chain, or tree = a mask span per pending token) the controller chooses
   per draft acceptance rate, with this device's costs and with the 2-core CPU reference costs, and
   the expected speed over AR;
3. live decoding with synthetic drafts: `verify` proposes the AR reference token with probability
   a per position (otherwise a wrong one), so acceptance is a by construction; tokens per forward,
   the mask tokens fed per forward and the wall-clock speed vs our `ar` policy (interleaved rounds, medians), and
   whether the output equals AR.
Exit status 1 when `verify`'s output differs from AR in the live table (its one stated goal), 2 when
CUDA is asked for and absent; the timings state no floor.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.bench.gpu_cost import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_gpu_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a small random model instead of the SmolLM2 shape")
    p.add_argument("--past", type=int, default=256, help="KV cache length while timing")
    p.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds per width")
    p.add_argument("--cap", type=int, default=16, help="horizon cap (k_max)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per prompt in the live table (0: skip it)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved ar/verify rounds per acceptance")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu (with --tiny for a quick check)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
