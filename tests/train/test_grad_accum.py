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


def _step(model, batches: list[dict], accum: int) -> dict[str, torch.Tensor]:
    cfg = load_config(None, [f"--train.grad_accum={accum}", f"--train.global_batch_size={8}", "--noise.k_max=4",
                             "--train.grad_clip=1e9"])
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
