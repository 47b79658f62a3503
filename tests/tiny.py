"""Hermetic test fixtures: a tiny byte-level BPE tokenizer with a ChatML chat template and a tiny
random Llama, both built in-process (no network, no files outside a temporary folder)."""
from __future__ import annotations

import torch

# the tokenizer is the one the benchmarks use (sdft.bench.synthetic), under its fixture name
from sdft.bench.synthetic import CHATML_TEMPLATE, build_chat_tokenizer as build_tiny_tokenizer  # noqa: F401


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                     tie_word_embeddings: bool = True, eos_token_id: int | None = None,
                     pad_token_id: int | None = None):
    """A randomly initialized LlamaForCausalLM small enough for CPU unit tests (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(folder, seed: int = 0, **kwargs):
    """Write a tiny tokenizer + random Llama to `folder` (save_pretrained layout); returns the folder."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(
        len(tokenizer), seed=seed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
