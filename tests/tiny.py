"""Hermetic test fixtures: a tiny byte-level BPE tokenizer with a ChatML chat template and a tiny
random Llama, both built in-process (no network, no files outside a temporary folder)."""
from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Action: getWeather\nAction Input: {\"city\": \"Paris\", \"unit\": \"celsius\"}",
    "<reasoning>\nThe molecule is polar.\n</reasoning>\n<answer>\nB\n</answer>",
    "This is an example for a response to the question:",
    "Now answer with a response of your own, including the thinking process.",
    "The answer is A. The answer is B. The answer is C. The answer is D.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]():;,.!?\"'-_+=*/",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast (byte-level BPE, ChatML template, eos = <|im_end|>, pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


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
