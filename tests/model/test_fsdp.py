"""pipeline.model.parallelize: 2-process FSDP2 (gloo, CPU, fp32) against a single-process reference.

One spawn of two ranks serves several tests (module fixture): gradients with and without activation
checkpointing, the bf16-on-gloo refusal, an FSDP2 export, a 30-step overfit run, and the training
loop's `verify` evaluation on the sharded model (ranks decode different work in lockstep).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.errors import FluidError
from pipeline.model.causal_lm import add_mask_token, forward_batch
from pipeline.model.losses import count_targets, metrics_from_sums, stage1_loss, target_sums
from pipeline.model.parallelize import apply_activation_checkpointing, apply_fsdp2, decoder_layers
from tests.model.test_model import MASK_ID, make_batch, rand_tokens, tiny_llama

WORLD = 2
STEPS = 30
LR = 1e-2
DECODE_PROMPTS = [rand_tokens(6, 30), rand_tokens(9, 31), rand_tokens(5, 32)]
DECODE_TOKENS = (10, 4)


class _Tok:
    """What the sampler needs of a tokenizer: no EOS, ids as text."""

    eos_token_id = pad_token_id = None

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


def global_batch():
    """4 rows; rank 0 gets rows 0–1, rank 1 rows 2–3, with different numbers of targets."""
    rows = [
        (rand_tokens(10, 20), [(1, 3)]),
        (rand_tokens(8, 21), []),
        (rand_tokens(16, 22), [(2, 6), (9, 4), (5, 2)]),
        (rand_tokens(16, 23), [(0, 5), (10, 5)]),
    ]
    return make_batch(rows, T=32)


def model_fn(seed: int = 7):
    return add_mask_token(tiny_llama(tied=True, seed=seed, hidden=32), MASK_ID).train()


def _half(batch, rank):
    n = batch["input_ids"].shape[0] // WORLD
    return {key: v[rank * n:(rank + 1) * n] for key, v in batch.items()}


def _fsdp_step(model, local, world):
    """Forward/backward with exact global means; returns the full (gathered) gradients."""
    counts = count_targets(local["labels"], local["k"])
    dist.all_reduce(counts)
    loss, _ = stage1_loss(forward_batch(model, local), local["labels"], local["k"],
                          global_count_by_k=counts, world_size=world)
    loss.backward()
    return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        local = _half(global_batch(), rank)
        res = {}
        try:
            apply_fsdp2(model_fn(), mixed_precision=True)
        except FluidError as e:
            res["bf16_error"] = str(e)

        model = apply_fsdp2(model_fn(), mixed_precision=False)
        res["grads"] = _fsdp_step(model, local, WORLD)
        model_ac = apply_fsdp2(apply_activation_checkpointing(model_fn()), mixed_precision=False)
        res["grads_ac"] = _fsdp_step(model_ac, local, WORLD)

        from pipeline.train.export import export_hf

        meta = {"mask_token": "<M>", "mask_token_id": MASK_ID, "k_max": 16,
                "policy_defaults": {"policy": "entropy", "gamma": 1.0, "max_horizon": 16},
                "base_model": {"spec": "tiny", "sha256": None}, "data_config": {}, "train_config": {}}
        res["export_ret"] = export_hf(model, None, os.path.join(out_dir, "export"), fluid_meta=meta)

        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            counts = count_targets(local["labels"], local["k"])
            dist.all_reduce(counts)
            logits = forward_batch(model, local)
            loss, _ = stage1_loss(logits, local["labels"], local["k"], global_count_by_k=counts, world_size=WORLD)
            loss.backward()
            opt.step()
            s, c = target_sums(logits.detach(), local["labels"], local["k"])
            dist.all_reduce(s)
            dist.all_reduce(c)
            losses.append(metrics_from_sums(s, c)["loss"])
        res["losses"] = losses

        from pipeline.train.decode_eval import verify_metrics

        res["weights"] = {n: t.full_tensor().clone() for n, t in model.state_dict().items()}
        mine = DECODE_PROMPTS[rank::WORLD]  # rank 0: two prompts of 10 tokens, rank 1: one of 4
        res["decode"] = verify_metrics(model, _Tok(), mine, mask_token_id=MASK_ID, k_max=4,
                                       max_tokens=DECODE_TOKENS[rank])
        opt.zero_grad(set_to_none=True)  # training goes on after the evaluation
        loss, _ = stage1_loss(forward_batch(model, local), local["labels"], local["k"], global_count_by_k=counts,
                              world_size=WORLD)
        loss.backward()
        opt.step()
        res["loss_after_decode"] = float(loss)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference_grads(batch):
    model = model_fn()
    loss, _ = stage1_loss(forward_batch(model, batch), batch["labels"], batch["k"])
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fsdp2_gradients_match_single_process_mean(fsdp_run):
    _, results = fsdp_run
    batch = global_batch()
    c0 = count_targets(_half(batch, 0)["labels"], _half(batch, 0)["k"])
    c1 = count_targets(_half(batch, 1)["labels"], _half(batch, 1)["k"])
    assert not torch.equal(c0, c1)  # unequal shards: per-rank means would be wrong
    ref = _reference_grads(batch)
    for res in results:
        for key in ("grads", "grads_ac"):
            got = res[key]
            assert got.keys() == ref.keys()
            for name, g in ref.items():
                torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=f"{key} {name}")
    # the tolerance is tight enough to catch a summed-instead-of-averaged reduction
    name = "model.embed_tokens.weight"
    assert not torch.allclose(2 * ref[name], results[0]["grads"][name], atol=1e-5, rtol=1e-4)


def test_bf16_on_gloo_is_refused(fsdp_run):
    _, results = fsdp_run
    assert "gloo" in results[0]["bf16_error"] and "bf16" in results[0]["bf16_error"]


def test_fsdp2_export_rank0_writes_loadable_model(fsdp_run):
    from pipeline.decode.load import load_export

    out, results = fsdp_run
    assert results[0]["export_ret"] is not None and results[1]["export_ret"] is None
    loaded, tok, meta = load_export(out / "export")
    assert tok is None and meta["mask_token_id"] == MASK_ID
    batch = global_batch()
    ref = model_fn().eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(loaded, batch), forward_batch(ref, batch), atol=1e-6, rtol=0)


def test_fsdp2_overfit_one_batch(fsdp_run):
    _, results = fsdp_run
    losses = results[0]["losses"]
    assert results[1]["losses"] == losses  # global metrics agree on both ranks
    assert losses[-1] < 0.5 * losses[0], losses


def test_verify_eval_on_fsdp_matches_one_process(fsdp_run):
    """Every rank joins every sharded forward; the totals equal one process decoding the same work."""
    from pipeline.train.decode_eval import verify_metrics

    _, results = fsdp_run
    assert results[0]["decode"] == results[1]["decode"]  # all-reduced: the same figure on every rank
    model = model_fn()
    model.load_state_dict(results[0]["weights"])
    ref = [verify_metrics(model, _Tok(), DECODE_PROMPTS[r::WORLD], mask_token_id=MASK_ID, k_max=4,
                          max_tokens=DECODE_TOKENS[r]) for r in range(WORLD)]
    got = results[0]["decode"]
    assert got["verify_tokens"] == sum(r["verify_tokens"] for r in ref) == 2 * 10 + 4
    assert got["verify_forwards"] == sum(r["verify_forwards"] for r in ref)
    assert got["verify_tpf"] == got["verify_tokens"] / got["verify_forwards"] >= 1.0
    assert model.training  # the evaluation hands the model back in training mode
    assert all(torch.isfinite(torch.tensor(r["loss_after_decode"])) for r in results)


def test_single_process_overfit_one_batch():
    model = model_fn()
    batch = global_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss, met = stage1_loss(forward_batch(model, batch), batch["labels"], batch["k"])
        loss.backward()
        opt.step()
        losses.append(met["loss"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_decoder_layers_and_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert len(decoder_layers(model_fn())) == 2
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50))
    assert len(decoder_layers(gpt2)) == 3
    with pytest.raises(FluidError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    if not dist.is_initialized():
        with pytest.raises(FluidError, match="process group"):
            apply_fsdp2(model_fn(), mixed_precision=False)


def test_activation_checkpointing_single_process_same_grads():
    batch = global_batch()
    ref = _reference_grads(batch)
    model = apply_activation_checkpointing(model_fn())
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss, _ = stage1_loss(forward_batch(model, batch), batch["labels"], batch["k"])
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_torch_fallback_same_grads():
    batch = global_batch()
    ref = _reference_grads(batch)
    model = model_fn()
    model.supports_gradient_checkpointing = False  # force torch's checkpoint wrapper
    apply_activation_checkpointing(model)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    loss, _ = stage1_loss(forward_batch(model, batch), batch["labels"], batch["k"])
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name.replace("_checkpoint_wrapped_module.", "")], atol=1e-6, rtol=1e-5)
    assert set(model.state_dict()) == set(model_fn().state_dict())  # export sees the plain names
