"""The decoding benchmark's pieces (sdft.bench.decode): the weight bytes of the floor count a tied output
layer once, the kept old sampler still draws from softmax(z) with the right log-probs and stops at the stop
token, and the report states the floor and the ratios it was given."""
import torch

from sdft.bench.decode import DecodeReport, DecodeSettings, format_report, old_decode, weight_bytes
from sdft.prompts import render_prompt_ids
from tests.tiny import build_tiny_llama


def test_weight_bytes_count_each_storage_once(tiny_tokenizer):
    tied = build_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=True)
    untied = build_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=False)
    embedding = tied.get_input_embeddings().weight
    assert weight_bytes(untied) - weight_bytes(tied) == embedding.numel() * 4
    assert weight_bytes(tied) == 4 * sum(p.numel() for p in tied.parameters())  # parameters() yields it once


def test_old_sampler_logprobs_and_stop(tiny_tokenizer, tiny_model):
    prompts = [render_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in ("Hi", "What is 2+2?")]
    with torch.no_grad():
        free = old_decode(tiny_model, prompts, max_new_tokens=6, seeds=[1, 2], pad_token_id=0, eos_token_ids=[-1])
        stop = free[0][0][2]
        stopped = old_decode(tiny_model, prompts, max_new_tokens=6, seeds=[1, 2], pad_token_id=0,
                             eos_token_ids=[stop])
        for prompt, (ids, lps, finished) in zip(prompts, free):
            assert len(ids) == 6 and not finished
            logits = tiny_model(torch.tensor([list(prompt) + ids])).logits[0, len(prompt) - 1:-1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lps), expected, rtol=0, atol=1e-5)
    ids, _, finished = stopped[0]
    assert finished and ids == free[0][0][:3]


def test_report_states_the_floor_and_the_ratios():
    report = DecodeReport(DecodeSettings(model="m", prompts=8, new_tokens=100, rounds=2), weight_bytes=10**9,
                          read_gbs=[10.0, 10.0], copy_gbs=[4.0, 6.0])
    report.seconds = {"old": [20.0, 22.0], "native": [15.0, 15.0]}
    text = format_report(report)
    assert "**100.0 ms** per decoding step" in text  # 1 GB / 10 GB/s
    assert "| old sampler (per-row draws) | 210.0 | 2.10x | 1.00x |" in text
    assert "| native sampler (batched) | 150.0 | 1.50x | 0.71x |" in text
