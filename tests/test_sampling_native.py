"""The native sampler's batched draw: the same completion for a prompt whatever its batch, its position or
the split over processes; equal, token for token, to a plain per-row sampler written here (full recomputation,
no cache, no padding, a Python loop over the vocabulary) fed the same counter-based noise; log-probs equal to
that reference's; the drawn distribution is softmax(z / T) within the top-p nucleus (chi-square); finished
rows leave the batch."""
import math
import random

import numpy as np
import pytest
import torch

from sdft.prompts import render_prompt_ids
from sdft.sampling import NativeSampler, SamplingParams
from sdft.sampling.draw import counter_uniforms, draw_seeds, draw_tokens
from tests.tiny import build_tiny_llama

QUESTIONS = ["Hi", "What is the capital of France? Answer in one word please.", "Action: getWeather",
             "<reasoning>\nThe molecule is polar.\n</reasoning>", "B", "The answer is C.", "0123456789"]


def _prompts(tokenizer):
    return [render_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _model(tokenizer, scale=3.0, dtype=torch.float64):
    """The tiny Llama with its matrices scaled up (outputs depend on the prompt), in float64 so that the
    cached, padded batch and the plain recomputation agree to ~1e-12 and the same noise picks the same token."""
    model = build_tiny_llama(len(tokenizer), tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(scale)
    return model


def _reference_probs(logits, temperature, top_p):
    """softmax(z / T) over the vocabulary in float64, zero outside the top-p nucleus (the smallest set of most
    likely tokens whose probability reaches top_p), renormalized: a plain list."""
    z = [float(x) / temperature for x in logits]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    s = sum(p)
    p = [x / s for x in p]
    if top_p < 1.0:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        keep, mass = set(), 0.0
        for i in order:
            if mass >= top_p:
                break
            keep.add(i)
            mass += p[i]
        p = [x if i in keep else 0.0 for i, x in enumerate(p)]
        s = sum(p)
        p = [x / s for x in p]
    return p


def _reference_sample(model, prompt, seed, max_new_tokens, temperature, top_p, eos_id):
    """One prompt alone: full forward every token, the token = first index whose running probability sum
    exceeds u * total, u = counter_uniforms([seed])[0, t]."""
    uniforms = counter_uniforms([seed], max_new_tokens)[0].tolist()
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        for t in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].tolist()
            p = _reference_probs(logits, temperature, top_p)
            target, running, token = uniforms[t] * sum(p), 0.0, None
            for i, x in enumerate(p):
                running += x
                if running > target and x > 0:
                    token = i
                    break
            out.append(token)
            lps.append(math.log(p[token]))
            ids.append(token)
            if token == eos_id:
                break
    return out, lps


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_batched_sampling_equals_a_plain_per_row_sampler(tiny_tokenizer, temperature, top_p):
    model = _model(tiny_tokenizer)
    prompts = _prompts(tiny_tokenizer)
    seeds = [11, 2**62 + 5, 7, 123456789, 0, 99, 31337]
    free = [_reference_sample(model, p, s, 10, temperature, top_p, None)[0] for p, s in zip(prompts, seeds)]
    eos = free[0][4]  # a stop token that ends some completions early and not others
    expected = [_reference_sample(model, p, s, 10, temperature, top_p, eos) for p, s in zip(prompts, seeds)]
    assert len({tuple(ids) for ids, _ in expected}) == len(expected)
    assert any(ids[-1] == eos for ids, _ in expected) and any(len(ids) == 10 for ids, _ in expected)
    sampler = NativeSampler(model, tiny_tokenizer, eos_token_ids=[eos])
    rollouts = sampler.sample(prompts, SamplingParams(10, temperature, top_p), seeds=seeds)
    for r, (ids, lps) in zip(rollouts, expected):
        assert list(r.completion_ids) == ids
        assert r.finished == (ids[-1] == eos)
        torch.testing.assert_close(torch.tensor(r.sampler_logprobs, dtype=torch.float64),
                                   torch.tensor(lps, dtype=torch.float64), rtol=0, atol=1e-9)


def test_float32_logprobs_match_the_reference(tiny_tokenizer):
    model32 = _model(tiny_tokenizer, dtype=torch.float32)
    prompts = _prompts(tiny_tokenizer)[:3]
    rollouts = NativeSampler(model32, tiny_tokenizer).sample(prompts, SamplingParams(8, 0.9, 0.95), seeds=[1, 2, 3])
    model64 = model32.to(torch.float64)
    for r in rollouts:  # the reference's log-probs of the tokens the float32 sampler drew
        ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)])
        with torch.no_grad():
            logits = model64(ids).logits[0, len(r.prompt_ids) - 1:-1]
        expected = [math.log(_reference_probs(row.tolist(), 0.9, 0.95)[token])
                    for row, token in zip(logits, r.completion_ids)]
        torch.testing.assert_close(torch.tensor(r.sampler_logprobs, dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)


def test_a_prompt_gets_the_same_completion_whatever_its_batch_and_process(tiny_tokenizer):
    model = _model(tiny_tokenizer, dtype=torch.float32)
    prompts = _prompts(tiny_tokenizer)
    seeds = [1000 + i for i in range(len(prompts))]
    params = SamplingParams(12)
    whole = NativeSampler(model, tiny_tokenizer).sample(prompts, params, seeds=seeds)
    assert len({r.completion_ids for r in whole}) == len(whole)

    def same(got, want):  # the same tokens; log-probs up to float32 rounding (a batch changes the padding)
        assert [(r.prompt_ids, r.completion_ids, r.finished) for r in got] == \
            [(r.prompt_ids, r.completion_ids, r.finished) for r in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.sampler_logprobs), torch.tensor(b.sampler_logprobs),
                                       rtol=0, atol=1e-5)

    for batch_size in (1, 3):
        same(NativeSampler(model, tiny_tokenizer, batch_size=batch_size).sample(prompts, params, seeds=seeds), whole)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = NativeSampler(model, tiny_tokenizer).sample([prompts[i] for i in order], params,
                                                           seeds=[seeds[i] for i in order])
    same([shuffled[order.index(i)] for i in range(len(prompts))], whole)
    for rank in range(2):  # the positions rank, rank + 2, ... of the batch, as a data-parallel process has them
        mine = list(range(rank, len(prompts), 2))
        part = NativeSampler(model, tiny_tokenizer).sample([prompts[i] for i in mine], params,
                                                           seeds=[seeds[i] for i in mine])
        same(part, [whole[i] for i in mine])


def test_finished_rows_leave_the_batch(tiny_tokenizer):
    model = _model(tiny_tokenizer, dtype=torch.float32)
    prompts = _prompts(tiny_tokenizer)
    free = NativeSampler(model, tiny_tokenizer).greedy(prompts, 10)
    eos = free[0][3]  # a stop token that ends some completions early and not others
    greedy = [c[:c.index(eos) + 1] if eos in c else c for c in free]
    assert len({len(c) for c in greedy}) > 2 and any(len(c) == 10 for c in greedy)
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        for every in (1, 3):
            widths.clear()
            assert NativeSampler(model, tiny_tokenizer, eos_token_ids=[eos],
                                 stop_check_every=every).greedy(prompts, 10) == greedy
            # decoding step t (1-based) feeds the rows still live after the last check at or before t
            live = [sum(1 for c in greedy if len(c) > (t // every) * every) for t in range(1, len(widths))]
            assert [w[0] for w in widths[1:]] == live, every
            assert all(w[1] == 1 for w in widths[1:])
    finally:
        hook.remove()
    assert widths[0] == (len(prompts), max(len(p) for p in prompts))  # the prefill


def _chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z = its normal quantile), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 1.0), (1.3, 0.75)])
def test_drawn_distribution_is_the_tempered_nucleus_softmax(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.0, 0.7])
    draws = 200_000
    tokens, lps = draw_tokens(logits.expand(draws, -1), counter_uniforms(range(draws), 1)[:, 0],
                              temperature, top_p)
    probs = _reference_probs(logits.tolist(), temperature, top_p)
    counts = np.bincount(tokens.numpy(), minlength=len(probs))
    support = [i for i, p in enumerate(probs) if p > 0]
    assert all(counts[i] == 0 for i in range(len(probs)) if probs[i] == 0)  # nothing outside the nucleus
    if top_p < 1:
        assert len(support) < len(probs)
    statistic = sum((counts[i] - draws * probs[i]) ** 2 / (draws * probs[i]) for i in support)
    assert statistic < _chi_square_critical(len(support) - 1), (statistic, counts, probs)
    torch.testing.assert_close(lps.double(), torch.tensor([math.log(probs[t]) for t in tokens.tolist()],
                                                          dtype=torch.float64), rtol=0, atol=1e-6)


def test_counter_uniforms_are_a_pure_function_of_seed_and_index():
    u = counter_uniforms([5, 6, 5], 64)
    assert u.shape == (3, 64) and u.dtype == torch.float64
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(counter_uniforms([6], 16)[0], u[1, :16])  # longer streams extend shorter ones
    assert len(set(u[0].tolist())) == 64
    generator = torch.Generator().manual_seed(3)
    seeds = draw_seeds(generator, 4)
    assert seeds == draw_seeds(torch.Generator().manual_seed(3), 4) and len(set(seeds)) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_sampling_without_seeds_draws_them_from_the_sampler_generator(tiny_tokenizer):
    model = _model(tiny_tokenizer, dtype=torch.float32)
    prompts = _prompts(tiny_tokenizer)[:3]
    sampler = NativeSampler(model, tiny_tokenizer, seed=4)
    first = sampler.sample(prompts, SamplingParams(6))
    explicit = NativeSampler(model, tiny_tokenizer).sample(
        prompts, SamplingParams(6), seeds=draw_seeds(torch.Generator().manual_seed(4), 3))
    assert first == explicit
    assert sampler.sample(prompts, SamplingParams(6)) != first  # the generator moved on
