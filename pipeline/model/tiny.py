"""A tiny random Llama with an in-process BPE tokenizer, for benchmarks and load tests without a download.

Out: (model, tokenizer, mask_token_id). The mask token is untrained, so its drafts are noise (the
sampler's worst case).
"""

from __future__ import annotations

import torch

TINY_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
             "of foolishness. The quick brown fox jumps over the lazy dog. Once upon a time there was a city. ")


def build_tiny(hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM with a byte-level BPE tokenizer trained in-process; returns
    (model, tokenizer, mask_token_id). The mask token is untrained, so drafts are noise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["[PAD]", "[EOS]", "[M]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TINY_TEXT * 10], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval(), tok, tok.convert_tokens_to_ids("[M]")
