"""Operand order of narrow products (pipeline/decode/matmul.py): same outputs, chosen by measurement."""

import pytest
import torch
from torch import nn

from pipeline.decode.matmul import (
    MAX_ROWS,
    WeightLeftLinear,
    apply_matmul,
    choose_matmul,
    current_matmul,
    set_matmul,
)
from pipeline.decode.sampler import GenerationRequest, Sampler
from pipeline.errors import FluidError
from pipeline.model.drafter import attach_drafter
from tests.conftest import make_tiny_llama, make_tiny_tokenizer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 5), (1, MAX_ROWS), (2, MAX_ROWS)])
def test_weight_left_equals_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, 24)
    ref = lin(x)
    set_matmul(lin, "weight_left")
    assert type(lin) is WeightLeftLinear
    with torch.inference_mode():
        out = lin(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # wider than MAX_ROWS, or with autograd: the stock path, bit for bit
    if shape[0] * shape[1] > MAX_ROWS:
        assert torch.equal(out, ref)
    assert torch.equal(lin(x), ref)  # autograd on (training): the stock path


def test_set_matmul_swaps_plain_linears_only_and_keeps_the_state_dict():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    plain = sum(type(m) is nn.Linear for m in model.modules())
    attach_drafter(model, len(tok), rank=2, alpha=4.0, targets=["q_proj", "down_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert current_matmul(model) == "stock"
    # every plain linear — the drafter's wrapped base layers too; the adapters' own A/B are plain as well
    n = set_matmul(model, "weight_left")
    assert n == sum(type(m) is WeightLeftLinear for m in model.modules()) and n >= plain
    assert current_matmul(model) == "weight_left"
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set_matmul(model, "stock") == n and current_matmul(model) == "stock"
    with pytest.raises(FluidError, match="unknown matmul layout 'fast'"):
        set_matmul(model, "fast")
    with pytest.raises(FluidError, match="unknown matmul layout"):
        apply_matmul(model, "fast")


def test_choose_matmul_keeps_the_faster_layout():
    model = make_tiny_llama(32)
    seen = []

    def timer(speeds):
        def t(m, widths):
            seen.append(current_matmul(m))
            return {w: [speeds[current_matmul(m)] * w] for w in widths}
        return t

    assert choose_matmul(model, rounds=3, timer=timer({"stock": 2.0, "weight_left": 1.0})) == "weight_left"
    assert current_matmul(model) == "weight_left"
    assert seen.count("stock") == 3 and seen.count("weight_left") == 3  # interleaved rounds
    assert choose_matmul(model, rounds=3, timer=timer({"stock": 1.0, "weight_left": 1.5})) == "stock"
    assert current_matmul(model) == "stock"
    assert choose_matmul(model, rounds=1, timer=timer({"stock": 1.0, "weight_left": 1.0})) == "stock"  # tie
    assert apply_matmul(model, "weight_left") == "weight_left" and current_matmul(model) == "weight_left"


def test_sampler_in_weight_left_layout_matches_hf_generate_and_stays_lossless():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok) + 1, seed=3, initializer_range=0.2)  # the last id is [M]
    mask_id = len(tok)
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = None
    prompts = [tok("the quick brown fox")["input_ids"], tok("to be or not")["input_ids"]]

    def run(policy, s):
        return [r.token_ids for r in s.generate([GenerationRequest(prompt_ids=p, policy=policy, max_tokens=20,
                                                                   stop_on_eos=False) for p in prompts])]

    stock = Sampler(model, tok, mask_token_id=mask_id, k_max=4, forward_cost=[1.0])
    ref = run("ar", stock)
    set_matmul(model, "weight_left")
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=4, forward_cost=[1.0])
    assert s.matmul == "weight_left"
    with torch.inference_mode():
        hf = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=20, suppress_tokens=[mask_id])[0, len(p):].tolist()
              for p in prompts]
    assert run("ar", s) == hf == ref
    assert run("verify", s) == ref


def test_bench_sampler_times_hf_generate_in_both_layouts(tmp_path, capsys):
    import json

    from pipeline.bench.sampler import build_parser, run

    out = tmp_path / "bench.json"
    assert run(build_parser().parse_args(["--max-tokens", "8", "--repeats", "1", "--policies", "verify", "--matmul",
                                          "weight_left", "--forward-cost", "1", "--min-speedup", "0",
                                          "--json", str(out)])) == 0
    raw = json.loads(out.read_text())
    assert raw["matmul"] == "weight_left" and raw["ar_equals_hf"] == 4
    assert raw["hf_stock_tokens_per_s"] > 0 and raw["hf_tokens_per_s"] > 0
    [verify] = [r for r in raw["rows"] if r["policy"] == "verify"]
    assert verify["prefix_agreement"] == 1.0 and verify["speedup_vs_hf_stock"] > 0
    assert "HF greedy generate, stock matmul layout" in capsys.readouterr().out
