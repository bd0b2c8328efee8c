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
