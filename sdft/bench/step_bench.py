"""One SDFT training step on a CPU, side by side with an SFT step and TRL's SDFTTrainer.

Columns (each a worker process holding its own copy of the model, so every peak-memory figure is its own):
  sdft     one step of `sdft.loop.sdft_step_fn` on the local backend: sample one completion per prompt,
           teacher forward on prompt + demonstration + completion, student forward+backward, optimizer
  sft      one step of `sdft.sft.sft_step_fn` on the same prompts, target = the demonstration + EOS
  sft_len  the same SFT step with target i cut or cycled to the length of completion i of the SDFT step of
           the same round (SFT on exactly the token counts, and so the padding, that SDFT trains on)
  trl      one optimizer step of `trl.experimental.sdft.SDFTTrainer` at the same settings (optional)

The columns run in lockstep: round r runs step r of every column back to back (SDFT first, the others in
rotating order), so that a changing load on a shared machine hits every column alike. Every column runs
`warmup` untimed rounds, then `repeats` timed ones; the table shows medians.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from sdft.bench.availability import trl_unavailable_reason
from sdft.bench.measure import release_memory
from sdft.bench.settings import StepSettings
from sdft.bench.step_columns import SdftColumn, SftColumn, data_source
from sdft.bench.step_report import (COLUMN_TITLES, COLUMNS, ROWS, format_table, ratios, round_ratios,
                                    summarize)
from sdft.bench.trl_column import TrlColumn
from sdft.bench.workers import python_call, worker_env

COLUMN_CLASSES = {"sdft": SdftColumn, "sft": SftColumn, "sft_len": SftColumn, "trl": TrlColumn}
_TAG = "BENCH_STEP "  # prefix of the worker's protocol lines on stdout


def _reply(kind: str, payload) -> None:
    sys.stdout.write(f"{_TAG}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def step_worker() -> int:
    """Entry point of a worker process: argv[1] holds {"column", "settings", "steps", "threads"} as JSON.
    Builds the column, then answers `step <json>` and `finish` lines on stdin with protocol lines on stdout."""
    spec = json.loads(sys.argv[1])
    try:
        worker = COLUMN_CLASSES[spec["column"]](StepSettings(**spec["settings"]), steps=spec["steps"],
                                                threads=spec["threads"])
        _reply("ready", {})
        for line in sys.stdin:
            command, _, payload = line.strip().partition(" ")
            if command == "step":
                result = worker.step(**json.loads(payload or "{}"))
                release_memory()
                _reply("result", result)
            elif command == "finish":
                _reply("final", worker.finish())
                return 0
    except Exception as error:  # noqa: BLE001 - reported to the parent
        _reply("error", f"{type(error).__name__}: {error}")
        raise
    return 0


class RemoteColumn:
    """A column in a worker process (`step_worker`), driven over its stdin and stdout."""

    def __init__(self, column: str, settings: StepSettings, *, steps: int, threads: int | None):
        spec = {"column": column, "settings": dataclasses.asdict(settings), "steps": steps, "threads": threads}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(python_call("sdft.bench.step_bench", "step_worker", json.dumps(spec)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=worker_env())
        self._read("ready")

    def _read(self, kind: str):
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                got, _, payload = line[len(_TAG):].strip().partition(" ")
                if got == "error":
                    raise RuntimeError(json.loads(payload))
                if got == kind:
                    return json.loads(payload)
        self.proc.wait()
        self._stderr.seek(0)
        tail = " | ".join(self._stderr.read().strip().splitlines()[-8:])
        raise RuntimeError(f"worker exited with code {self.proc.returncode}: {tail}")

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self, **extra) -> dict:
        self._send("step " + json.dumps(extra))
        return self._read("result")

    def finish(self) -> dict:
        self._send("finish")
        result = self._read("final")
        self.proc.wait(timeout=600)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def load_average() -> str:
    try:
        return "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def machine(threads: int | None) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({threads or torch.get_num_threads()} threads per worker)")


def _drop(workers: dict, column: str, keep: bool = False) -> None:
    """Stop a worker process (if the column runs in one) and, unless `keep`, forget the column."""
    worker = workers[column] if keep else workers.pop(column)
    if isinstance(worker, RemoteColumn):
        worker.close()


def run_benchmark(settings: StepSettings, *, columns, repeats: int = 3, warmup: int = 1, threads: int | None = None,
                  in_process: bool = False, json_path: str | None = None,
                  log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Start every column, run the warm-up and timed rounds in lockstep, log and return the results:
    {"summaries", "notes", "ratios", "round_ratios", "table", "steps", "memory", "settings"}."""
    start = time.perf_counter()
    s = settings
    described = (f"{s.model}, {s.prompts} prompts x {s.new_tokens} new tokens, LoRA rank {s.lora_rank}, "
                 f"fp32, {s.targets} forward KL, {s.teacher} teacher, {warmup} warm-up + {repeats} "
                 f"timed steps per column; data: {data_source(s)}; {machine(threads)}")
    log(f"bench_step: {described}; {load_average()} at the start")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5 and not threads:
        log("note: the machine is busy; torch threads oversubscribed by other processes can slow every column "
            "many times over: consider --threads 1")
    workers, notes, steps, memory = {}, {}, {}, {}
    for column in columns:
        if column == "trl":
            reason = trl_unavailable_reason()
            if reason is not None:
                notes[column] = reason
                log(reason)
                continue
        if column == "sft_len" and "sdft" not in columns:
            notes[column] = "needs the SDFT column (its completion lengths)"
            continue
        t0 = time.perf_counter()
        try:
            workers[column] = (COLUMN_CLASSES[column](settings, steps=warmup + repeats, threads=threads)
                               if in_process else RemoteColumn(column, settings, steps=warmup + repeats,
                                                               threads=threads))
        except Exception as error:  # noqa: BLE001 - a failing column is reported, not fatal
            notes[column] = f"failed to start: {error}"
            log(f"  {COLUMN_TITLES[column]}: {notes[column]}")
            continue
        steps[column] = []
        log(f"  {COLUMN_TITLES[column]}: ready ({time.perf_counter() - t0:.0f} s)")

    last_sdft: dict = {}  # the SDFT column runs first in every round
    try:
        for round_index in range(warmup + repeats):
            others = [c for c in COLUMNS if c in workers and c != "sdft"]
            shift = round_index % max(1, len(others))
            order = (["sdft"] if "sdft" in workers else []) + others[shift:] + others[:shift]
            timed = round_index >= warmup
            for column in order:
                if column not in workers:
                    continue
                extra = {}
                if column == "sft_len":
                    if "sdft" not in workers:
                        notes[column] = "needs the SDFT column, which failed"
                        _drop(workers, column)
                        continue
                    extra["target_lengths"] = last_sdft["completion_lengths"]
                try:
                    result = workers[column].step(**extra)
                except Exception as error:  # noqa: BLE001
                    notes[column] = f"failed: {error}"
                    _drop(workers, column)
                    log(f"  {COLUMN_TITLES[column]}: {notes[column]}")
                    continue
                if column == "sdft":
                    last_sdft = result
                if timed:
                    steps[column].append(result)
                parts = ", ".join(f"{key[:-2]} {result[key]:.2f}" for key in ("sample_s", "teacher_s", "student_s")
                                  if result[key] == result[key])
                log(f"  round {round_index + 1}{'' if timed else ' (warm-up)'} {COLUMN_TITLES[column]}: "
                    f"{result['total_s']:.2f} s ({parts}), {result['completion_tokens']:.0f} completion tokens")
        for column, worker in workers.items():
            memory[column] = worker.finish()
    finally:
        for column in list(workers):
            _drop(workers, column, keep=True)

    summaries = {c: summarize(steps[c], memory.get(c, {})) for c in workers if steps.get(c)}
    table = format_table(summaries, notes, ROWS)
    rows = ratios(summaries)
    log("")
    log(table)
    log("")
    if "sdft/sft" in rows or "sdft/sft_len" in rows:
        log(f"SDFT / SFT step time: {rows.get('sdft/sft', float('nan')):.2f}x (demonstration targets), "
            f"{rows.get('sdft/sft_len', float('nan')):.2f}x (targets as long as the completions); "
            "goal <= 2.5x, the paper reports about 4x")
    if "trl/sdft" in rows:
        log(f"TRL SDFTTrainer / SDFT step time: {rows['trl/sdft']:.2f}x "
            f"({rows['trl/sdft per completion token']:.2f}x per completion token)")
    per_round = {}
    for numerator, denominator in (("sdft", "sft"), ("sdft", "sft_len"), ("trl", "sdft")):
        if numerator in summaries and denominator in summaries:
            per_round[f"{numerator}/{denominator}"] = values = round_ratios(steps, numerator, denominator)
            log(f"{numerator}/{denominator} round by round: " + ", ".join(f"{r:.2f}x" for r in values))
    for column, note in notes.items():
        log(f"{COLUMN_TITLES[column]}: {note}")
    if any(not m.get("peak_reset", True) for m in memory.values()):
        log("note: the peak RSS could not be reset after loading; peaks may include the loading transient")
    if in_process and len(summaries) > 1:
        log("note: --in-process: all columns share one process, so a peak RSS rise includes earlier columns")
    log(f"total benchmark time {time.perf_counter() - start:.0f} s; {load_average()} at the end")
    out = {"summaries": summaries, "notes": notes, "ratios": rows, "round_ratios": per_round, "table": table,
           "steps": steps, "memory": memory, "settings": described}
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out
