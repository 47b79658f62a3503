"""Models and tokenizers made in-process, with no download: a small byte-level BPE chat tokenizer and randomly
initialized Qwen2-shaped causal LMs, saved in the save_pretrained layout so that `model.name` can point at them.

The tokenizer knows a few hundred tokens; a model's vocabulary may be larger (ids beyond the tokenizer are
valid model ids that the training step never decodes), so a model of a real vocabulary size can be trained
and sampled from with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def build_chat_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast (byte-level BPE trained on a small built-in corpus, ChatML template,
    eos = <|im_end|>, pad = <|endoftext|>)."""
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


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Qwen2 causal LM (tied input and output embeddings unless `tied` is False)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True
    max_positions: int = 32768

    def parameters(self) -> int:
        """Number of weights: embeddings (+ output layer if untied), attention (q, k, v with biases, o),
        MLP (gate, up, down) and RMSNorm weights."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attention = self.hidden * (self.hidden + 2 * kv) + (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


QWEN2_5_1_5B = ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936)
TINY_QWEN2 = ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=512, max_positions=2048)


def qwen2_config(shape: ModelShape, tokenizer):
    """A transformers Qwen2Config of `shape` whose special ids are the tokenizer's."""
    from transformers import Qwen2Config

    if shape.vocab < len(tokenizer):
        raise ValueError(f"the model vocabulary ({shape.vocab}) must hold the tokenizer's {len(tokenizer)} tokens")
    return Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=shape.tied, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )


def save_random_qwen2(folder: str | Path, shape: ModelShape, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu") -> Path:
    """Write a randomly initialized Qwen2ForCausalLM of `shape` (built on `device` in `dtype`, weights drawn
    from seed `seed`) and the chat tokenizer to `folder`; returns the folder."""
    from transformers import Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = build_chat_tokenizer()
    config = qwen2_config(shape, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder
