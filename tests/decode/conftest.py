"""Fixtures of the decoding tests: a tiny random Llama (its mask token is untrained: drafts are noise)
and a byte-level BPE tokenizer trained in-process."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = ("The quick brown fox jumps over the lazy dog. Café crème, naïve façade. "
        "日本語のテキストです。 Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich. ") * 20


@pytest.fixture(scope="module")
def tok():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[EOS]", "[M]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, pad_token_id=tok.pad_token_id, eos_token_id=None,
                      bos_token_id=None, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = tok.pad_token_id
    return m


@pytest.fixture(scope="module")
def mask_id(tok):
    return tok.convert_tokens_to_ids("[M]")
