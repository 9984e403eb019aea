"""Tiny random models and a word-level tokenizer, built offline for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Olmo2Config,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

WORDS = (
    "the a of in is lives works plays city job colour Alice Bob Carol Dave Paris Rome Oslo Lima "
    "doctor baker pilot red blue green piano violin drum . , ? ! : ; and to who where what"
).split()
EOS = "<|endoftext|>"


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with byte fallback characters, EOS, optional BOS prepended on encode."""
    vocab = {EOS: 0, "<unk>": 1, "<s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("Ġ" + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, unk_token="<unk>", bos_token="<s>" if bos else None
    )


def tiny_config(family: str, vocab_size: int, layers: int = 2):
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=128, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "olmo2":
        return Olmo2Config(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                             max_position_embeddings=128, **common)
    if family == "opt":
        return OPTConfig(num_hidden_layers=layers, hidden_size=16, ffn_dim=24, num_attention_heads=2,
                         word_embed_proj_dim=16, max_position_embeddings=128, dropout=0.0, **common)
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str = "gpt2", layers: int = 2, seed: int = 0, bos: bool = False) -> Path:
    tokenizer = make_tokenizer(bos=bos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), layers))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
