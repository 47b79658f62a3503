"""One SDFT step beside one SFT step on the same tokens, on one device, one column after the other.

The SDFT column (`sdft.loop.sdft_step_fn`) runs `warmup` untimed and `repeats` timed steps and keeps the
completion lengths of each; then it is freed and the SFT column (`sdft.sft.sft_step_fn`) runs the same
number of steps, step r with target i cut or cycled to the length of completion i of SDFT step r: both
columns train on the same token counts (and so the same padding). Times are medians over the timed steps;
on a GPU the device is synchronized after every backend call, so each phase's time includes its device
work. Ratio = SDFT step time / SFT step time (medians), also given step by step.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from sdft.bench.settings import StepSettings
from sdft.bench.step_columns import SdftColumn, SftColumn
from sdft.bench.step_report import GPU_ROWS, ROWS, format_table, round_ratios, summarize


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_column(column_class, settings, *, device, warmup, repeats, extras, title, log):
    """All warmup + repeats steps of one column (results in order) and its memory figures; the column is
    freed before returning."""
    column = column_class(settings, steps=warmup + repeats, device=device)
    steps = []
    try:
        for index in range(warmup + repeats):
            result = column.step(**extras(index))
            steps.append(result)
            log(f"  {title} step {index + 1}{'' if index >= warmup else ' (warm-up)'}: {result['total_s']:.2f} s, "
                f"{result['completion_tokens']:.0f} trained tokens")
        memory = column.finish()
    finally:
        del column
        _free(torch.device(device))
    return steps, memory


def compare_steps(settings: StepSettings, *, device: str = "cuda", warmup: int = 1, repeats: int = 2,
                  log: Callable[[str], None] = print) -> dict:
    """SDFT then SFT on the same token counts: {"summaries": {"sdft", "sft_len"}, "steps", "memory",
    "ratio", "round_ratios", "equal_tokens" (every SFT step trained on the token counts of its SDFT step),
    "finished" (completions that ended with EOS before max_new_tokens), "table"}."""
    dev = torch.device(device)
    sdft_steps, sdft_memory = _run_column(SdftColumn, settings, device=device, warmup=warmup, repeats=repeats,
                                          extras=lambda index: {}, title="SDFT", log=log)
    rounds = [s["completion_lengths"] for s in sdft_steps]
    sft_steps, sft_memory = _run_column(SftColumn, settings, device=device, warmup=warmup, repeats=repeats,
                                        extras=lambda index: {"target_lengths": rounds[index]},
                                        title="SFT (same length)", log=log)
    sdft_timed, sft_steps = sdft_steps[warmup:], sft_steps[warmup:]
    steps = {"sdft": sdft_timed, "sft_len": sft_steps}
    memory = {"sdft": sdft_memory, "sft_len": sft_memory}
    summaries = {c: summarize(steps[c], memory[c]) for c in steps}
    per_round = round_ratios(steps, "sdft", "sft_len")
    ratio = summaries["sdft"]["total_s"] / summaries["sft_len"]["total_s"]
    equal = len(sft_steps) == len(sdft_timed) and all(
        sft["completion_lengths"] == [max(1, n) for n in sdft["completion_lengths"]]
        for sdft, sft in zip(sdft_timed, sft_steps))
    return {"summaries": summaries, "steps": steps, "memory": memory, "ratio": ratio, "round_ratios": per_round,
            "equal_tokens": equal, "finished": sum(s.get("finished", 0) for s in sdft_timed),
            "table": format_table(summaries, {}, GPU_ROWS if dev.type == "cuda" else ROWS)}
