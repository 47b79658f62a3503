"""Decoding speed: the native sampler against the weight-read floor, the previous sampler and vLLM.

A decoding step of a batch reads every weight of the model once (the output layer's [V, H] matrix
included; the embedding lookup reads only the batch's rows, but a tied output layer reads the whole
matrix), so on a machine whose decoding is memory-bound a step takes at least

    floor = bytes of the weights / memory bandwidth,

with the bandwidth measured in the same run: the read rate of a large tensor sum and the rate of a large
tensor copy (bytes read + written), the faster of the two. The KV cache, activations and sampling add to
that and are not in the floor.

Columns, each sampling the same prompts with temperature 1 and top-p 1 for exactly `new_tokens` tokens
(stop tokens switched off, so every column decodes prompts x new_tokens tokens):
  old     the previous native sampler, kept here as it was: one torch.Generator and one multinomial draw
          per prompt in a Python loop every token, a growing KV cache, finished rows decoded to the end
  native  `sdft.sampling.NativeSampler`: one batched inverse-CDF draw per token, counter-based noise
  vllm    the engine of `sdft.sampling.vllm.VLLMSampler` on the model's folder (when vLLM is installed), the
          model's weights loaded into it once, then the sampler's requests (per-prompt seed, log-prob of the
          sampled token) with the stop tokens held back until new_tokens (`min_tokens`)
The columns run in lockstep: round r runs every column once, one after the other, so a change in the
machine's load hits them alike; `warmup` untimed rounds first. Reported: the median over rounds of the
time per decoding step (the whole call, prefill included, divided by new_tokens) and its ratio to the floor.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["DecodeSettings", "DecodeReport", "measure_bandwidth", "weight_bytes", "old_decode", "run_decode_bench",
           "format_report"]

COLUMNS = ("old", "native", "vllm")
TITLES = {"old": "old sampler (per-row draws)", "native": "native sampler (batched)", "vllm": "vLLM"}
NEVER = -1  # a stop id no model produces: every column decodes exactly new_tokens tokens


@dataclass(frozen=True)
class DecodeSettings:
    model: str = "SmolLM2-135M-Instruct"
    prompts: int = 8
    new_tokens: int = 128
    rounds: int = 3
    warmup: int = 1
    threads: int | None = None
    columns: tuple[str, ...] = COLUMNS


@dataclass
class DecodeReport:
    settings: DecodeSettings
    weight_bytes: int
    read_gbs: list[float] = field(default_factory=list)
    copy_gbs: list[float] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)   # column -> per-round call time
    skipped: dict[str, str] = field(default_factory=dict)            # column -> why it did not run
    load_before: float = 0.0
    load_after: float = 0.0
    machine: str = ""
    engine_start_s: float | None = None

    @property
    def bandwidth_gbs(self) -> float:
        return max(statistics.median(self.read_gbs), statistics.median(self.copy_gbs))

    @property
    def floor_ms(self) -> float:
        return self.weight_bytes / (self.bandwidth_gbs * 1e9) * 1e3

    def step_ms(self, column: str) -> float:
        return statistics.median(self.seconds[column]) / self.settings.new_tokens * 1e3


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, each storage once (a tied output layer counted with the embedding)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def measure_bandwidth(size_bytes: int = 2**30, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s of x.sum() over a size_bytes float32 tensor, copy GB/s of y.copy_(x) counting the bytes read
    and written), medians over repeats."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    reads, copies = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        reads.append(size_bytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        y.copy_(x)
        copies.append(2 * size_bytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(reads), statistics.median(copies)


def old_decode(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seeds: Sequence[int],
               pad_token_id: int, eos_token_ids: Sequence[int]) -> list[tuple[list[int], list[float], bool]]:
    """The previous native sampler (T = 1, top-p 1), as it was: left-padded KV-cache decoding that draws each
    row's token with torch.multinomial from that row's own generator in a Python loop, checks on the host
    every token whether all rows are done, and keeps decoding finished rows."""
    device = next(causal_lm.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[b, width - len(prompt):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    out = causal_lm(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, alive = [], [], []
    for t in range(max_new_tokens):
        lp = torch.log_softmax(out.logits[:, -1].float(), -1)
        probs = lp.exp()
        token = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
        token_lp = lp.gather(-1, token[:, None])[:, 0]
        alive.append(~done)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(token_lp)
        done = done | torch.isin(token, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = causal_lm(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    tokens, logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
    alive, finished = torch.stack(alive, 1).tolist(), done.tolist()
    return [(tokens[b][:sum(alive[b])], logprobs[b][:sum(alive[b])], bool(finished[b])) for b in range(batch)]


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _bench_prompts(tokenizer, count: int) -> list[list[int]]:
    from sdft.data import QUICKSTART_DIR, load_jsonl_examples
    from sdft.prompts import render_prompt_ids, student_messages

    pool = load_jsonl_examples(QUICKSTART_DIR / "train.jsonl")
    return [list(render_prompt_ids(tokenizer, student_messages(pool[i % len(pool)]))) for i in range(count)]


def run_decode_bench(settings: DecodeSettings, *, progress: Callable[[str], None] = lambda line: None) -> DecodeReport:
    """Load the model (float32), measure the bandwidth, run the columns in lockstep rounds. Call from under
    `if __name__ == "__main__":` (the vLLM column starts worker processes)."""
    from sdft.models import load_model_and_tokenizer, resolve_model_path
    from sdft.sampling import NativeSampler, SamplingParams
    from sdft.sampling.base import padding_token_id, stop_token_ids

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, tokenizer = load_model_and_tokenizer(settings.model)
    model.eval()
    prompts = _bench_prompts(tokenizer, settings.prompts)
    seeds = list(range(1, settings.prompts + 1))
    params = SamplingParams(settings.new_tokens)
    pad = padding_token_id(tokenizer, stop_token_ids(tokenizer, model.generation_config))
    report = DecodeReport(settings, weight_bytes(model), load_before=_load_avg(),
                          machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                                  f"({torch.get_num_threads()} threads)")
    native = NativeSampler(model, tokenizer, eos_token_ids=[NEVER])
    runs: dict[str, Callable[[], None]] = {}
    for column in settings.columns:
        if column == "old":
            def run_old():
                with torch.no_grad():
                    old_decode(model, prompts, max_new_tokens=settings.new_tokens, seeds=seeds, pad_token_id=pad,
                               eos_token_ids=[NEVER])
            runs[column] = run_old
        elif column == "native":
            runs[column] = lambda: native.sample(prompts, params, seeds=seeds)
        elif column == "vllm":
            try:
                from sdft.sampling.vllm import VLLMSampler, import_vllm
                from sdft.sampling.weights import policy_weights

                vllm = import_vllm()
                from vllm.inputs import TokensPrompt
            except ImportError as error:
                report.skipped[column] = str(error)
                continue
            start = time.perf_counter()
            engine = VLLMSampler(resolve_model_path(settings.model), tokenizer, weights=lambda: policy_weights(model),
                                 max_model_len=1024)
            report.engine_start_s = time.perf_counter() - start
            engine.load_weights()
            # the sampler's own requests, with the stop tokens held back until new_tokens (vLLM takes no
            # out-of-vocabulary stop id)
            requests = [vllm.SamplingParams(n=1, max_tokens=settings.new_tokens, min_tokens=settings.new_tokens,
                                            temperature=1.0, top_p=1.0, seed=seed, logprobs=0, ignore_eos=True,
                                            detokenize=False) for seed in seeds]
            token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
            runs[column] = lambda engine=engine: engine.llm.generate(token_prompts, requests, use_tqdm=False)
        else:
            raise ValueError(f"unknown column {column!r}; allowed: {', '.join(COLUMNS)}")
    for column in runs:
        report.seconds[column] = []
    for round_index in range(settings.warmup + settings.rounds):
        read, copy = measure_bandwidth()
        timed = round_index >= settings.warmup
        if timed:
            report.read_gbs.append(read)
            report.copy_gbs.append(copy)
        for column, run in runs.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if timed:
                report.seconds[column].append(elapsed)
            progress(f"round {round_index + 1 - settings.warmup}{' (warm-up)' if not timed else ''} {column}: "
                     f"{elapsed:.2f} s, load {_load_avg():.1f}")
    report.load_after = _load_avg()
    return report


def format_report(report: DecodeReport) -> str:
    """A markdown table: ms per decoding step, ratio to the floor and to the old sampler, per column."""
    s = report.settings
    lines = [f"Model {s.model} (float32, {report.weight_bytes / 2**20:.0f} MiB of weights), {s.prompts} prompts x "
             f"{s.new_tokens} new tokens, T = 1, top-p 1; {report.machine}. Load average {report.load_before:.1f} "
             f"at the start, {report.load_after:.1f} at the end; medians of {s.rounds} rounds.",
             "",
             f"Bandwidth: read {statistics.median(report.read_gbs):.1f} GB/s, copy "
             f"{statistics.median(report.copy_gbs):.1f} GB/s; floor = weights / {report.bandwidth_gbs:.1f} GB/s = "
             f"**{report.floor_ms:.1f} ms** per decoding step.",
             "",
             "| | ms per decoding step | x floor | x old | tokens/s | rounds (s per call) |",
             "|---|---:|---:|---:|---:|---|"]
    lines.append(f"| weight-read floor | {report.floor_ms:.1f} | 1.00x | | "
                 f"{s.prompts / report.floor_ms * 1e3:.0f} | |")
    old = report.step_ms("old") if report.seconds.get("old") else None
    for column, seconds in report.seconds.items():
        ms = report.step_ms(column)
        lines.append(f"| {TITLES[column]} | {ms:.1f} | {ms / report.floor_ms:.2f}x | "
                     f"{'' if old is None else f'{ms / old:.2f}x'} | {s.prompts / ms * 1e3:.0f} | "
                     f"{', '.join(f'{x:.2f}' for x in seconds)} |")
    for column, why in report.skipped.items():
        lines.append(f"| {TITLES[column]} | not run: {why} | | | | |")
    if report.engine_start_s is not None:
        lines += ["", f"vLLM engine start: {report.engine_start_s:.1f} s (not in the table)."]
    return "\n".join(lines)
