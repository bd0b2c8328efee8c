"""Gradient accumulation is exact: grad_accum = 2 over two half batches equals one batch of twice the size."""

import copy

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.noise import make_two_stream_example, rng_for
from pipeline.train.step import train_step
from tests.conftest import make_tiny_llama

VOCAB, MASK, L = 40, 39, 12


def _examples(n: int) -> dict[str, torch.Tensor]:
    rows = []
    for i in range(n):
        rng = rng_for(0, 0, i)
        tokens = rng.integers(2, MASK, size=L).astype(np.int32)
        rows.append(make_two_stream_example(tokens, rng, mask_id=MASK, pad_id=1, eos_id=1, k_max=4,
                                            draft_tokens=L, rho=0.0))
    return {c: torch.from_numpy(np.stack([r[c] for r in rows])).long() for c in rows[0]}


def _step(model, batches: list[dict], accum: int, *extra: str) -> dict[str, torch.Tensor]:
    cfg = load_config(None, [f"--train.grad_accum={accum}", f"--train.global_batch_size={8}", "--noise.k_max=4",
                             "--train.grad_clip=1e9", *extra])
    model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # update = −gradient, exactly
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_step(model, iter(batches), opt, sched, list(model.parameters()), cfg, step=0, device="cpu")
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}


def test_grad_accum_two_equals_one_batch_of_twice_the_size():
    model = make_tiny_llama(VOCAB)
    batch = _examples(8)
    batch["labels"][0, 2:9] = -100  # fewer targets in the first half (as padding would make)
    batch["k"][0, 2:9] = 0
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    targets = [int((h["labels"] != -100).sum()) for h in halves]
    assert targets[0] != targets[1]  # unequal target counts: a mean of per-batch means would differ
    whole = _step(model, [batch], accum=1)
    accumulated = _step(model, halves, accum=2)
    for name, g in whole.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in whole.values())


def test_cpu_bf16_autocast_step_is_close_to_fp32_and_keeps_fp32_weights():
    """model.dtype=bfloat16 on CPU: the forward runs under bf16 autocast (so the update differs from
    fp32's, slightly), parameters and their update stay fp32."""
    model = make_tiny_llama(VOCAB)
    batch = _examples(8)
    fp32 = _step(model, [batch], 1)
    bf16 = _step(model, [batch], 1, "--model.dtype=bfloat16")
    flat32 = torch.cat([g.flatten() for g in fp32.values()])
    flat16 = torch.cat([bf16[k].flatten() for k in fp32])
    assert all(g.dtype == torch.float32 for g in bf16.values())
    assert not torch.equal(flat32, flat16)  # autocast really ran in bf16
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cos > 0.99 and (flat16.norm() / flat32.norm() - 1).abs() < 0.05, (cos, flat16.norm(), flat32.norm())
