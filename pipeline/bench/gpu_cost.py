"""The forward-cost benchmark (`python -m jobs.bench_gpu_cost`): forward cost by width on a device, and
the cost-aware `verify` horizon it leads to.

In:  a device and dtype, and a randomly initialised model (the SmolLM2-135M shape plus the [M] row, or
     a tiny one); the job's options (KV cache length, timing rounds, horizon cap, live-table size).
Out: three printed tables — forward cost by width (`calibrate`), the horizon the controller chooses
     per acceptance rate here and with the CPU reference costs (`plan_table`), live `verify` decoding
     with synthetic drafts (`live`: tokens per forward, masks per forward, speed vs `ar`, equal to AR) —
     and `run`'s exit status: 0 when `verify`'s output equals AR at every acceptance, else 1.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from pipeline.decode.cost_model import CostAwareHorizon, ForwardCost, calibrate

CPU_REFERENCE = ForwardCost({1: 1.0, 2: 1.6, 4: 1.45, 8: 1.6, 16: 1.93, 32: 2.5})  # 2-core CPU, SmolLM2-135M fp32
ACCEPTANCE = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


class _Tokenizer:
    """Enough of a tokenizer for the sampler: no EOS, ids as text."""

    eos_token_id = None
    pad_token_id = None

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


def build_model(tiny: bool, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024) if tiny else
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49153))  # SmolLM2-135M + [M]
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def plan_table(cost: ForwardCost, cap: int) -> list[tuple]:
    """(a, K on this device, expected speed there, K with CPU costs, expected speed there) per acceptance."""
    rows = []
    for a in ACCEPTANCE:
        out = [a]
        for c in (cost, CPU_REFERENCE):
            h = CostAwareHorizon(cap, c)
            h.acceptance = lambda a=a: [a] * (cap - 1)
            k, layout, _nodes = h.best()
            r = h.rates(layout=layout)
            out += [f"{k}{'' if layout == 'chain' else ' ' + layout}", r[k - 1] / r[0]]
        rows.append(tuple(out))
    return rows


def live(model, cost: ForwardCost, *, cap: int, tokens: int, prompts: int, rounds: int, seed: int = 0) -> list[dict]:
    from pipeline.decode.sampler import GenerationRequest, Sampler, _Decoder

    vocab = model.config.vocab_size - 1
    sampler = Sampler(model, _Tokenizer(), mask_token_id=vocab, k_max=cap, forward_cost=cost)
    rng = random.Random(seed)
    prompt_ids = [[rng.randrange(vocab) for _ in range(32)] for _ in range(prompts)]

    def run(policy):
        reqs = [GenerationRequest(prompt_ids=p, policy=policy, max_tokens=tokens, stop_on_eos=False) for p in prompt_ids]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = [sampler.generate(q) for q in reqs]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return [r[0] for r in res], time.perf_counter() - t0

    ref = {tuple(p): r.token_ids for p, r in zip(prompt_ids, run("ar")[0], strict=True)}
    original = _Decoder._propose
    rows = []
    try:
        for a in ACCEPTANCE:
            drng = random.Random(seed + 1)

            def propose(self, row, masks, start, a=a, drng=drng):
                r = ref[tuple(row.r.prompt_ids)]
                return [(r[start + j] if start + j < len(r) and drng.random() < a else (r[min(start + j, len(r) - 1)] + 1) % vocab)
                        for j in range(masks.shape[0])]

            _Decoder._propose = propose
            ratios = []
            for i in range(rounds):
                order = ("ar", "verify") if i % 2 == 0 else ("verify", "ar")
                times = {}
                for pol in order:
                    res, times[pol] = run(pol)
                    if pol == "verify":
                        out = res
                ratios.append(times["ar"] / times["verify"])
            same = all(r.token_ids == ref[tuple(p)] for r, p in zip(out, prompt_ids, strict=True))
            fwd = sum(r.stats.forwards for r in out)
            masks = sum(r.stats.mask_tokens for r in out) / fwd
            rows.append({"a": a, "tpf": sum(r.stats.tokens for r in out) / fwd, "masks_per_forward": masks,
                         "speed_vs_ar": statistics.median(ratios), "equal_to_ar": same})
    finally:
        _Decoder._propose = original
    return rows


@torch.inference_mode()
def _ms_per_ar_step(model, past: int, n: int = 10) -> float:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.zeros((1, past), dtype=torch.long, device=dev), past_key_values=cache, use_cache=True)
    x = torch.zeros((1, 1), dtype=torch.long, device=dev)
    times = []
    for i in range(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=x, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[past + i]], device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def print_costs(model, args) -> ForwardCost:
    """Table 1: the forward cost by width 1…32, 48, 64 (what `cost_model.calibrate` measures at load)."""
    widths = [*range(1, 33), 48, 64]  # the tree layout at K = 8 is 64 wide
    cost = calibrate(model, widths=widths, past=args.past, repeats=args.repeats)
    base_ms = _ms_per_ar_step(model, args.past)
    print(f"\n1. forward cost by width (1 = one AR step, ~{base_ms:.2f} ms here)")
    for lo in range(0, len(widths), 8):
        print("   " + "  ".join(f"w{w:>2} {cost(w):5.2f}" for w in widths[lo:lo + 8]))
    return cost


def print_plan(cost: ForwardCost, cap: int) -> None:
    """Table 2: the horizon (and layout) chosen per acceptance, here and with the CPU reference costs."""
    print(f"\n2. horizon chosen by the cost model (cap {cap}); expected speed = rate(K) / rate(AR)")
    print(f"   {'acceptance':>10}  {'K here':>7} {'speed':>6}   {'K on CPU ref':>12} {'speed':>6}")
    for a, k, s, kc, sc in plan_table(cost, cap):
        print(f"   {a:>10.2f}  {k:>7} {s:>6.2f}   {kc:>12} {sc:>6.2f}")


def print_live(model, cost: ForwardCost, args) -> list[dict]:
    """Table 3: live `verify` with synthetic drafts per acceptance; its rows."""
    print(f"\n3. live verify with synthetic drafts ({args.prompts} prompts x {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds; speed = wall-clock vs our ar policy)")
    print(f"   {'acceptance':>10} {'tok/fwd':>8} {'masks':>7} {'x ar':>6} {'== ar':>6}")
    rows = live(model, cost, cap=args.cap, tokens=args.tokens, prompts=args.prompts, rounds=args.rounds)
    for r in rows:
        print(f"   {r['a']:>10.2f} {r['tpf']:>8.2f} {r['masks_per_forward']:>7.2f} {r['speed_vs_ar']:>6.2f} {str(r['equal_to_ar']):>6}")
    return rows


def run(args) -> int:
    """The three tables and the goal: exit status 0 when `verify`'s output equals AR at every acceptance."""
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    t0 = time.perf_counter()
    model = build_model(args.tiny, dtype, args.device)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}  dtype: {dtype}  model: {'tiny' if args.tiny else 'SmolLM2-135M shape'} (random)  "
          f"past: {args.past}  torch {torch.__version__}")
    cost = print_costs(model, args)
    print_plan(cost, args.cap)
    rows = print_live(model, cost, args) if args.tokens else []
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    lossless = all(r["equal_to_ar"] for r in rows) if args.tokens else True
    print(f"goal verify's output = AR at every acceptance: {'met' if lossless else 'NOT met'}")
    return 0 if lossless else 1
