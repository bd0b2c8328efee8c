"""Integration: the sampler on the real default model (SmolLM2-135M) with an untrained mask token."""

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "To be, or not to be, that is"]


@pytest.fixture(scope="module")
def smollm_sampler(default_model):
    from transformers import AutoTokenizer

    from pipeline.decode.sampler import Sampler
    from pipeline.model.causal_lm import add_mask_token, load_causal_lm

    torch.set_num_threads(2)
    model = add_mask_token(load_causal_lm(default_model.path), default_model.mask_token_id)
    tok = AutoTokenizer.from_pretrained(default_model.path)
    return Sampler(model, tok, mask_token_id=default_model.mask_token_id, k_max=16)


def _hf_greedy(sampler, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([sampler.encode(prompt)])
    with torch.inference_mode():
        out = sampler.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=2,
                                     suppress_tokens=[sampler.mask_token_id])
    return out[0, ids.shape[1]:].tolist()


def test_ar_and_verify_equal_hf_greedy_on_smollm2(smollm_sampler):
    from pipeline.decode.sampler import GenerationRequest

    for prompt in PROMPTS:
        ref = _hf_greedy(smollm_sampler, prompt, 20)
        ar, verify, entropy = smollm_sampler.generate([
            GenerationRequest(prompt=prompt, max_tokens=20, policy=p, stop_on_eos=False)
            for p in ("ar", "verify", "entropy")])
        assert ar.token_ids == ref, prompt
        assert verify.token_ids == ref, prompt  # lossless whatever the (untrained) drafts
        assert entropy.stats.forwards >= 18  # untrained drafts: nearly one token per forward
        assert smollm_sampler.mask_token_id not in verify.token_ids + entropy.token_ids


@pytest.mark.parametrize("layout", ["candidates", "spans+candidates"])
def test_candidate_trees_equal_hf_greedy_on_smollm2(smollm_sampler, monkeypatch, layout):
    """Tree steps forced (K = 4, 8 nodes from the untrained mask's top tokens): alone and batched (rows of
    different lengths), the output is HF greedy's."""
    from pipeline.decode import candidates as cand
    from pipeline.decode.cost_model import CostAwareHorizon
    from pipeline.decode.sampler import GenerationRequest, Sampler

    monkeypatch.setattr(CostAwareHorizon, "best", lambda self, floor=1: (4, layout, 8))
    s = Sampler(smollm_sampler.model, smollm_sampler.tokenizer, mask_token_id=smollm_sampler.mask_token_id,
                k_max=4, forward_cost=[1.0], verify_layouts=(layout,))
    reqs = [GenerationRequest(prompt=p, max_tokens=12, policy="verify", stop_on_eos=False) for p in PROMPTS]
    refs = [_hf_greedy(smollm_sampler, p, 12) for p in PROMPTS]
    dec, trees = s.decoder(reqs[:1]), 0
    while not dec.done:
        dec.step()
        trees += not cand.is_chain(dec.rows[0].parents)
    assert dec.rows[0].generated == refs[0] and trees > 0
    assert [r.token_ids for r in s.generate(reqs)] == refs
