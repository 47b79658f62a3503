"""The native sampler's greedy decoding: equal to full recomputation one prompt at a time, whatever the
batching and left padding; stops at the stop token (kept); restores the caller's training mode."""
import pytest
import torch

from sdft.prompts import render_prompt_ids
from sdft.sampling import NativeSampler


def _oracle_greedy(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding by full recomputation, one prompt at a time, no padding and no cache."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out


def _prompts(tokenizer):
    questions = ["Hi", "What is the capital of France? Answer in one word please.",
                 "Action: getWeather", "<reasoning>\nThe molecule is polar.\n</reasoning>", "B"]
    return [render_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def _prompt_sensitive_model(tokenizer):
    """The tiny Llama with its matrices scaled up: at the default init scale its greedy output barely
    depends on the prompt, which would hide padding and masking errors."""
    from tests.tiny import build_tiny_llama

    model = build_tiny_llama(len(tokenizer), tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(10.0)
    return model


def test_greedy_matches_oracle_and_batching_is_invariant(tiny_tokenizer):
    model = _prompt_sensitive_model(tiny_tokenizer)
    prompts = _prompts(tiny_tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    expected = [_oracle_greedy(model, p, 10, tiny_tokenizer.eos_token_id) for p in prompts]
    assert len({tuple(c) for c in expected}) == len(expected)  # the outputs depend on the prompt
    for batch_size in (1, 2, 8):
        assert NativeSampler(model, tiny_tokenizer, batch_size=batch_size).greedy(prompts, 10) == expected


def test_greedy_on_default_tiny_model_is_batch_invariant(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    single = NativeSampler(tiny_model, tiny_tokenizer, batch_size=1).greedy(prompts, 6)
    assert NativeSampler(tiny_model, tiny_tokenizer, batch_size=3).greedy(prompts, 6) == single
    assert all(len(c) == 6 for c in single)


def test_generation_stops_at_eos_and_drops_padding(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    model = _prompt_sensitive_model(tiny_tokenizer)
    prompts = _prompts(tiny_tokenizer)
    expected = [_oracle_greedy(model, p, 10, eos) for p in prompts]
    stopped = [c for c in expected if c[-1] == eos]
    assert stopped and len(stopped) < len(expected)  # some items stop early, others run to the limit
    assert all(len(c) == 10 or c[-1] == eos for c in expected)
    model.train()
    got = NativeSampler(model, tiny_tokenizer, batch_size=len(prompts)).greedy(prompts, 10)
    assert got == expected
    assert all(c.count(eos) <= 1 and pad not in c for c in got)
    assert model.training  # the caller's mode is restored


def test_greedy_errors(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        NativeSampler(tiny_model, tiny_tokenizer, batch_size=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] must hold at least one token"):
        NativeSampler(tiny_model, tiny_tokenizer).greedy([[5], []], 3)
