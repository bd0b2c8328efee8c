"""Frozen-base drafter: clean-stream logits are the base model's, `verify` reproduces the base model's
greedy output, and the export carries the base weights byte for byte."""

import numpy as np
import pytest
import torch

from pipeline.data.noise import make_two_stream_example
from pipeline.model.causal_lm import forward_batch
from pipeline.model.drafter import attach_drafter, draft_gate, find_drafter
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _drafter(vocab: int, seed: int = 0):
    """(base, same weights + a drafter with random non-zero LoRA and [M] vector); [M] = vocab (new id)."""
    base = make_tiny_llama(vocab, seed=seed)
    model = make_tiny_llama(vocab, seed=seed)
    attach_drafter(model, vocab, rank=4, alpha=8.0, targets=TARGETS)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return base, model


def _batch(tokens, mask_id, seed=0, rho=0.3):
    ex = make_two_stream_example(np.asarray(tokens), np.random.default_rng(seed), mask_id=mask_id, pad_id=1,
                                 eos_id=1, k_max=5, rho=rho)
    return {k: torch.as_tensor(v.astype(np.int64))[None] for k, v in ex.items()}


def test_only_the_drafter_trains_and_clean_logits_equal_the_base():
    base, model = _drafter(40)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("mask_vector") or ".lora_" in n for n in trainable)
    assert model.get_input_embeddings().num_embeddings == 41 and base.get_input_embeddings().num_embeddings == 40
    tokens = np.random.default_rng(0).integers(2, 40, size=24)
    batch = _batch(tokens, 40)
    assert (batch["input_ids"] == 40).any() and (batch["span_id"] >= 0).any()
    logits = forward_batch(model, batch)
    clean = batch["span_id"][0] == -1
    ref = base(input_ids=torch.as_tensor(tokens)[None]).logits
    torch.testing.assert_close(logits[0, clean], ref[0], rtol=0, atol=1e-6)
    # the draft stream does pass the adapter: zeroing it changes the draft logits
    draft = batch["span_id"][0] >= 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.zero_()
    plain = forward_batch(model, batch)
    assert (logits[0, draft] - plain[0, draft]).abs().max() > 1e-3
    torch.testing.assert_close(plain[0, clean], ref[0], rtol=0, atol=1e-6)


def test_restored_tokens_in_a_span_pass_the_adapter():
    _, model = _drafter(40)
    batch = _batch(np.random.default_rng(1).integers(2, 40, size=24), 40, rho=1.0)  # every span token restored
    assert not (batch["input_ids"] == 40).any()
    emb = find_drafter(model)
    forward_batch(model, batch)
    assert torch.equal(emb._gate.current, batch["span_id"] >= 0)  # gated by span, not by the [M] id
    with draft_gate(model, torch.zeros_like(batch["span_id"], dtype=torch.bool)):
        pass
    assert emb._gate.explicit is None


def test_verify_with_the_drafter_reproduces_the_base_greedy_output():
    from pipeline.decode.sampler import GenerationRequest, Sampler

    tok = make_tiny_tokenizer()
    vocab = len(tok)
    base, model = _drafter(vocab, seed=2)
    # every width priced as one step: drafts are proposed whatever this machine's load (a measured table
    # made under load can price every draft out, and the test then checks no draft at all)
    sampler = Sampler(model, tok, mask_token_id=vocab, k_max=6, forward_cost=[1.0])
    prompts = [[5, 6, 7], [9, 3, 12, 4, 8], [20]]
    out = sampler.generate([GenerationRequest(prompt_ids=p, max_tokens=24, policy="verify", stop_on_eos=False)
                            for p in prompts])
    for p, res in zip(prompts, out, strict=True):
        ids = torch.tensor([p])
        ref = base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                            min_new_tokens=24, pad_token_id=1)[0, len(p):].tolist()
        assert res.token_ids == ref
        own = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                             min_new_tokens=24, pad_token_id=1)[0, len(p):].tolist()
        assert own == ref  # HF generate on the drafter model never feeds [M]: it is the base model
        assert res.stats.mask_tokens > 0  # drafts were proposed (and checked) along the way


def test_export_keeps_base_bytes_and_loads_as_a_sampler(tmp_path):
    from pipeline.decode.load import load_sampler
    from pipeline.train.export import export_hf

    tok = make_tiny_tokenizer()
    vocab = len(tok)
    base_dir = tmp_path / "base"
    make_tiny_llama(vocab, seed=4).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    _, model = _drafter(vocab, seed=4)
    meta = {"mask_token": "[M]", "mask_token_id": vocab, "k_max": 6,
            "policy_defaults": {"policy": "verify", "gamma": 0.9, "max_horizon": 6},
            "base_model": {"spec": str(base_dir), "sha256": None}, "data_config": {}, "train_config": {}}
    out = export_hf(model, tok, tmp_path / "export", fluid_meta=meta, base_dir=base_dir)
    assert (out / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()
    sampler = load_sampler(out)
    loaded = sampler.model
    assert find_drafter(loaded) is not None
    batch = _batch(np.random.default_rng(5).integers(2, vocab, size=20), vocab)
    torch.testing.assert_close(forward_batch(loaded, batch), forward_batch(model, batch), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="drafter"):
        (out / "drafter.safetensors").unlink()
        load_sampler(out)


def test_drafter_forward_splits_the_clean_stream_off_autograd_with_the_same_logits_and_gradients():
    from pipeline.model.causal_lm import clean_prefix_len, drafter_forward_batch

    _, model = _drafter(40, seed=3)
    rows = [_batch(np.random.default_rng(s).integers(2, 40, size=24), 40, seed=s) for s in range(3)]
    batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    assert clean_prefix_len(batch["span_id"]) == 24
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(model, batch)
        sel = batch["labels"] >= 0
        torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel]).backward()
        return logits.detach(), [p.grad.clone() for p in trainable]

    ref_logits, ref_grads = run(forward_batch)
    logits, grads = run(drafter_forward_batch)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in grads) > 0


def test_clean_prefix_len_refuses_interleaved_layouts():
    from pipeline.model.causal_lm import clean_prefix_len

    assert clean_prefix_len(torch.tensor([[-1, -1, 0, 0, -2]])) == 2
    assert clean_prefix_len(torch.tensor([[-1, -2, 0, -2], [-1, -1, 0, 0]])) == 2  # a padded clean stream
    assert clean_prefix_len(torch.tensor([[-1, 0, -1, 0]])) is None                # a draft before clean
    assert clean_prefix_len(torch.tensor([[-1, -1, -1]])) is None                  # no draft part
    assert clean_prefix_len(torch.tensor([[0, 0, -2]])) is None                    # no clean part


@pytest.mark.parametrize("matmul", ["stock", "weight_left"])
@pytest.mark.parametrize("layout", ["suffix", "scattered"])
def test_decoding_pays_the_adapter_on_draft_rows_only(layout, matmul):
    """Without autograd the delta runs on the draft rows alone (a slice for one run of masks, an index
    otherwise): clean rows are the base model's bit for bit and draft rows equal the training form. In
    either operand order of the narrow products (decode/matmul.py): an adapted module's base product is
    its base module's, so it takes the same order as the base model's."""
    from pipeline.decode.matmul import set_matmul

    base, model = _drafter(40)
    assert set_matmul(base, matmul) > 0 and set_matmul(model, matmul) > 0
    ids = torch.as_tensor(np.random.default_rng(2).integers(2, 40, size=(2, 12)))
    if layout == "suffix":
        ids = ids[:1].clone()
        ids[0, 8:] = 40
    else:
        ids[0, 5:9], ids[1, 2], ids[1, 10:] = 40, 40, 40
    is_mask = ids == 40
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        ref = base(input_ids=ids.masked_fill(is_mask, 0)).logits
    rows = find_drafter(model)._gate.rows
    assert isinstance(rows, slice) == (layout == "suffix")
    # clean positions precede every mask of their row only in the suffix layout; the scattered one has
    # clean tokens after masks, whose logits then read draft keys: compare the positions before the first mask
    first = is_mask.int().argmax(1)
    for b in range(ids.shape[0]):
        assert torch.equal(got[b, : first[b]], ref[b, : first[b]])
    with torch.enable_grad():
        trained_form = model(input_ids=ids).logits.detach()
    assert find_drafter(model)._gate.rows is None
    torch.testing.assert_close(got, trained_form, rtol=1e-5, atol=1e-5)
    assert (got[is_mask] - base(input_ids=ids.masked_fill(is_mask, 0)).logits[is_mask]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["suffix", "scattered"])
def test_bf16_decoding_runs_the_low_rank_products_in_float32_and_keeps_clean_rows_exact(layout):
    """On a CPU in bf16 the draft rows' rank-r products run in float32 (bf16 small products cost a fixed
    ~25 µs each): clean rows stay the bf16 base model's bit for bit; draft rows equal the float32 delta
    computed by hand, rounded once; a change of the LoRA weights is seen (the float32 copies are remade)."""
    from pipeline.model.drafter import GatedLoRA

    base, model = _drafter(40)
    base, model = base.to(torch.bfloat16), model.to(torch.bfloat16)
    ids = torch.as_tensor(np.random.default_rng(3).integers(2, 40, size=(2, 10)))
    if layout == "suffix":
        ids = ids[:1].clone()
        ids[0, 6:] = 40
    else:
        ids[0, 3:5], ids[1, 7:] = 40, 40
    is_mask = ids == 40
    first = is_mask.int().argmax(1)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        ref = base(input_ids=ids.masked_fill(is_mask, 0)).logits
    for b in range(ids.shape[0]):
        assert torch.equal(got[b, : first[b]], ref[b, : first[b]])
    lora = next(m for m in model.modules() if isinstance(m, GatedLoRA))
    x = torch.randn(1, 5, lora.base.in_features, dtype=torch.bfloat16)
    y = torch.nn.functional.linear(x, lora.base.weight)
    delta = (x[0, 2:].float() @ lora.lora_A.weight.float().t() @ lora.lora_B.weight.float().t()).to(torch.bfloat16)
    want = y.clone()
    want[0, 2:] += lora.scale * delta
    with torch.inference_mode():
        assert torch.equal(lora._add_on_draft_rows(x, y.clone(), slice(2, 5)), want)
    with torch.no_grad():
        lora.lora_B.weight.zero_()
    with torch.inference_mode():
        assert torch.equal(lora._add_on_draft_rows(x, y.clone(), slice(2, 5)), y)  # the new weights are read


def test_lora_layers_puts_the_drafter_on_the_chosen_layers_and_round_trips_through_the_export(tmp_path):
    from pipeline.errors import FluidError
    from pipeline.model.drafter import GatedLoRA, load_drafter

    model = make_tiny_llama(40, num_hidden_layers=4)
    attach_drafter(model, 40, rank=4, alpha=8.0, targets=["q_proj", "down_proj"], layers=[0, -1])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, GatedLoRA))
    assert wrapped == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                       "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    assert model.config.fluid_drafter["layers"] == [0, 3]
    from safetensors.torch import save_file

    from pipeline.model.drafter import DRAFTER_FILE, drafter_state
    save_file(drafter_state(model.state_dict()), str(tmp_path / DRAFTER_FILE))
    spec = {**model.config.fluid_drafter, "mask_token_id": 40}
    again = load_drafter(make_tiny_llama(40, num_hidden_layers=4), tmp_path, spec)
    assert sorted(n for n, m in again.named_modules() if isinstance(m, GatedLoRA)) == wrapped
    older = {k: v for k, v in spec.items() if k != "layers"}  # exports written before lora_layers: all layers
    with pytest.raises(FluidError, match="tensors do not match"):
        load_drafter(make_tiny_llama(40, num_hidden_layers=4), tmp_path, older)
    with pytest.raises(FluidError, match=r"train.lora_layers \[4, -5\] out of range for a model of 4 layers"):
        attach_drafter(make_tiny_llama(40, num_hidden_layers=4), 40, rank=4, alpha=8.0, targets=["q_proj"],
                       layers=[1, 4, -5])
