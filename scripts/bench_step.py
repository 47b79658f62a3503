#!/usr/bin/env python
"""Benchmark one SDFT training step on CPU, side by side with an SFT step and TRL's SDFTTrainer.

Columns (each a worker subprocess holding its own copy of the model, so every peak-memory figure is its own):
  sdft     one step of `sdft.loop.sdft_step_fn` on the local backend: sample one completion per prompt,
           teacher forward on prompt + demonstration + completion, student forward+backward, optimizer
  sft      one step of `sdft.sft.sft_step_fn` on the same prompts, target = the demonstration + EOS
  sft_len  the same SFT step with target i cut or cycled to the length of completion i of the SDFT step of
           the same round (SFT on exactly the token counts, and so the padding, that SDFT trains on)
  trl      one optimizer step of `trl.experimental.sdft.SDFTTrainer` at the same settings (optional:
           pip install 'sdft[bench]')

The columns run in lockstep: round r runs step r of every column back to back (SDFT first, the others in
rotating order), so that a changing load on a shared machine hits every column alike. Every column runs
--warmup untimed rounds, then --repeats timed ones; the table shows medians.

Times per step: sampling, teacher forward, student forward+backward (train_step's step time minus its
optimizer time), optimizer (gradient clip + AdamW + schedule, plus the teacher update for EMA) and the
whole step. TRL's teacher forward runs inside its loss: it is reported together with the student
forward+backward (and its gradient clip). SFT's step reports no optimizer split: its forward+backward
includes the optimizer. Throughput: completion tokens per second of the whole step, and tokens processed
per second (tokens in the training forward passes: student prompt + completion, plus teacher prompt +
completion for SDFT). Memory: the rise of the worker's peak RSS over its RSS right after the model is
loaded (the peak is reset at that point where /proc/self/clear_refs allows it).

  python scripts/bench_step.py                                  # 8 prompts, 128 new tokens, 3 repeats
  python scripts/bench_step.py --prompts 2 --new-tokens 16 --repeats 1 --skip-trl
  python scripts/bench_step.py --targets topk --teacher ema --threads 1
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

COLUMNS = ("sdft", "sft", "sft_len", "trl")
COLUMN_TITLES = {"sdft": "SDFT (sdft)", "sft": "SFT (demonstration)", "sft_len": "SFT (same length)",
                 "trl": "TRL SDFTTrainer"}
ROWS = (  # (key, title, format)
    ("sample_s", "sampling (s)", "{:.2f}"),
    ("teacher_s", "teacher forward (s)", "{:.2f}"),
    ("student_s", "student forward+backward (s)", "{:.2f}"),
    ("optimizer_s", "optimizer (s)", "{:.3f}"),
    ("total_s", "total step (s)", "{:.2f}"),
    ("completion_tokens", "completion (SFT: target) tokens per step", "{:.0f}"),
    ("processed_tokens", "tokens processed per step", "{:.0f}"),
    ("completion_tok_s", "completion (SFT: target) tokens/s", "{:.1f}"),
    ("processed_tok_s", "tokens processed/s", "{:.1f}"),
    ("peak_rise_mib", "peak RSS rise over the loaded model (MiB)", "{:.0f}"),
)
TRL_MISSING = "TRL not installed: pip install 'sdft[bench]'"
_TAG = "BENCH_STEP "  # prefix of the worker's protocol lines on stdout

# Used when the packaged quickstart data is absent: short questions with a few-sentence demonstration.
INLINE_PROMPTS = [
    ("What is the capital of France?",
     "The capital of France is Paris. It lies on the Seine in the north of the country and has been the seat of "
     "the French government for most of the last thousand years."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the molecules of the air, and short wavelengths are scattered much more strongly "
     "than long ones (Rayleigh scattering). Blue light therefore reaches our eyes from every direction of the sky."),
    ("How many days are there in a leap year?",
     "A leap year has 366 days: the usual 365 plus February 29, which keeps the calendar aligned with the "
     "Earth's orbit around the Sun."),
    ("What does a CPU cache do?",
     "A CPU cache is a small, fast memory close to the processor cores. It keeps recently used data and "
     "instructions so that the processor does not have to wait for the much slower main memory."),
    ("Name the largest planet in the solar system.",
     "Jupiter is the largest planet in the solar system. It is a gas giant with more than three hundred times "
     "the mass of the Earth."),
    ("What is photosynthesis?",
     "Photosynthesis is the process by which plants, algae and some bacteria use the energy of light to turn "
     "carbon dioxide and water into sugar, releasing oxygen as a by-product."),
    ("Convert 100 degrees Celsius to Fahrenheit.",
     "Multiply by 9/5 and add 32: 100 * 9 / 5 + 32 = 212. So 100 degrees Celsius is 212 degrees Fahrenheit, "
     "the boiling point of water at sea level."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. The first primes "
     "are 2, 3, 5, 7, 11 and 13."),
]


# ------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that idle workers hold little more
    than their model while another column runs; the peak RSS is unaffected."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="the packaged model's name or a local save_pretrained folder")
    parser.add_argument("--data", default=None,
                        help="a JSONL file of prompts (default: the packaged quickstart train.jsonl if present, "
                             "else 8 built-in prompts)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (one completion each)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per completion")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="prompts per forward/backward (default: all prompts at once, as TRL does)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per column (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, per column")
    parser.add_argument("--targets", choices=("full", "topk"), default="full",
                        help="full-vocabulary forward KL, or the teacher's top-K (K = --topk)")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--teacher", choices=("static", "ema"), default="static")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", default=",".join(COLUMNS), help=f"a subset of {','.join(COLUMNS)}")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL column")
    parser.add_argument("--in-process", action="store_true",
                        help="run every column in this process (no subprocesses; peak memory is then shared)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--worker", choices=COLUMNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("prompts", "new_tokens", "repeats", "lora_rank", "topk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.micro_batch_size is not None and (args.micro_batch_size < 1 or args.prompts % args.micro_batch_size):
        parser.error("--micro-batch-size must be >= 1 and divide --prompts")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown or not columns:
        parser.error(f"--columns must name some of {', '.join(COLUMNS)}; got {args.columns!r}")
    args.columns = [c for c in COLUMNS if c in columns and not (c == "trl" and args.skip_trl)]
    return args


def bench_config(args):
    """The run configuration of the benchmark (sdft.config), from which every column is built."""
    from sdft.config import load_config

    micro = args.micro_batch_size or args.prompts
    return load_config(None, [
        f"seed={args.seed}", f"model.name={args.model}", "model.dtype=float32",
        "student.mode=lora", f"student.lora_rank={args.lora_rank}",
        f"teacher.mode={args.teacher}", f"objective.targets={args.targets}", "objective.full.kind=forward", f"objective.topk.k={args.topk}",
        "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_ratio=0.0",
        f"optim.batch_size={args.prompts}", f"optim.micro_batch_size={micro}",
        f"generation.max_new_tokens={args.new_tokens}", f"generation.batch_size={args.prompts}",
        f"data.path={args.data or 'built-in'}",
    ])


def data_source(args) -> str:
    from sdft.data import QUICKSTART_DIR

    if args.data:
        return args.data
    return "package:quickstart/train.jsonl" if (QUICKSTART_DIR / "train.jsonl").is_file() else "built-in prompts"


def bench_examples(args):
    """--prompts PromptExamples: from --data, the quickstart train.jsonl, or INLINE_PROMPTS (cycled)."""
    from sdft.data import QUICKSTART_DIR, PromptExample, load_jsonl_examples

    path = Path(args.data) if args.data else QUICKSTART_DIR / "train.jsonl"
    if args.data or path.is_file():
        pool = load_jsonl_examples(path)
    else:
        pool = [PromptExample(id=f"built-in/{i}", messages=({"role": "user", "content": q},), demonstration=a,
                              answer=a) for i, (q, a) in enumerate(INLINE_PROMPTS)]
    return [pool[i % len(pool)] for i in range(args.prompts)]


# ------------------------------------------------------------------------------------------- columns
class Column(abc.ABC):
    """One trainer at the benchmark's settings: `step(**extra)` runs and times one optimizer step,
    `finish()` returns the memory figures. The model is loaded here and the peak RSS reset after it."""

    def __init__(self, args):
        import torch

        from sdft.batches import encode_examples
        from sdft.models import load_model_and_tokenizer
        from sdft.runner import seed_everything

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.config = config = bench_config(args)
        self.examples = bench_examples(args)
        seed_everything(config.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(config.model.name, cache_dir=config.model.cache_dir)
        self.batch = encode_examples(self.tokenizer, self.examples, template=config.teacher.template,
                                     max_prompt_tokens=config.data.max_prompt_tokens)
        self.peak_reset = _reset_peak_rss()
        self.loaded_rss = _rss_bytes()
        self.steps_done = 0

    @abc.abstractmethod
    def step(self, **extra) -> dict:
        """Run one timed step of this column; returns its measurements."""

    def finish(self) -> dict:
        return {"loaded_rss_mib": self.loaded_rss / 2**20,
                "peak_rise_mib": (_peak_rss_bytes() - self.loaded_rss) / 2**20, "peak_reset": self.peak_reset}


class RecordingBackend:
    """Forwards everything to a backend and keeps the rollouts of its last `sample` call."""

    def __init__(self, backend):
        self.backend, self.rollouts = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def sample(self, prompt_ids, params, **options):
        self.rollouts = self.backend.sample(prompt_ids, params, **options)
        return self.rollouts


class SdftColumn(Column):
    def __init__(self, args):
        super().__init__(args)
        from sdft.build import build_local_backend
        from sdft.loop import sdft_step_fn

        self.backend = RecordingBackend(build_local_backend(self.config, self.model, self.tokenizer,
                                                           steps=args.warmup + args.repeats))
        self.step_fn = sdft_step_fn(self.config)

    def step(self, **extra) -> dict:
        self.steps_done += 1
        m = self.step_fn(self.backend, self.batch, self.steps_done)
        lengths = [len(r.completion_ids) for r in self.backend.rollouts]
        completion = sum(lengths)
        accounted = m["sample_time_s"] + m["teacher_time_s"] + m["train_time_s"]
        prompts = sum(len(b.student_ids) + len(b.teacher_ids) for b in self.batch)
        return {"sample_s": m["sample_time_s"], "teacher_s": m["teacher_time_s"],
                "student_s": m["train_time_s"] - m["optimizer_time_s"],
                "optimizer_s": m["optimizer_time_s"] + (m["step_time_s"] - accounted),  # + the teacher update
                "total_s": m["step_time_s"], "completion_tokens": completion,
                "processed_tokens": prompts + 2 * completion, "completion_lengths": lengths}


class SftColumn(Column):
    """SFT steps; `step(target_lengths=[L_1, ...])` cuts or cycles target i to L_i tokens (at least 1)."""

    def __init__(self, args):
        super().__init__(args)
        from sdft.build import build_local_backend
        from sdft.sft import sft_step_fn

        self.backend = build_local_backend(self.config, self.model, self.tokenizer, steps=args.warmup + args.repeats)
        self.step_fn = sft_step_fn(self.config)

    def step(self, target_lengths: list[int] | None = None, **extra) -> dict:
        self.steps_done += 1
        batch = self.batch
        if target_lengths is not None:
            batch = [dataclasses.replace(b, target_ids=tuple(b.target_ids[i % len(b.target_ids)]
                                                             for i in range(max(1, length))))
                     for b, length in zip(batch, target_lengths)]
        m = self.step_fn(self.backend, batch, self.steps_done)
        targets = sum(len(b.target_ids) for b in batch)
        optimizer = m.get("optimizer_time_s")
        return {"sample_s": float("nan"), "teacher_s": float("nan"),
                "student_s": m["step_time_s"] - (optimizer or 0.0),
                "optimizer_s": float("nan") if optimizer is None else optimizer, "total_s": m["step_time_s"],
                "completion_tokens": targets, "processed_tokens": sum(len(b.student_ids) for b in batch) + targets}


def trl_teacher_template(template: str) -> str:
    """A teacher template of sdft.prompts in TRL's `teacher_prompt_template` form ({prompt}, {privileged_context})."""
    from sdft.prompts import render_teacher_content

    return render_teacher_content("{prompt}", "{privileged_context}", template)


def trl_config(config, args, output_dir: str):
    """trl.experimental.sdft.SDFTConfig at the settings of `config`: one completion per prompt, all prompts
    in one forward, fp32 without gradient checkpointing (TRL's defaults are bf16 with checkpointing),
    forward KL (distillation_alpha 0) on the full logits or the top-K, teacher "base" (the LoRA adapter
    disabled, as sdft's static teacher) or "ema"."""
    from trl.experimental.sdft import SDFTConfig

    optim, loss, generation = config.optim, config.loss, config.generation
    return SDFTConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1, num_generations=1,
        max_steps=args.warmup + args.repeats, max_completion_length=generation.max_new_tokens,
        max_prompt_length=config.data.max_prompt_tokens, temperature=generation.temperature, top_p=generation.top_p,
        top_k=0, learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=optim.weight_decay, adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_epsilon=optim.eps,
        optim="adamw_torch", max_grad_norm=optim.max_grad_norm or 0.0,
        teacher_model_kind="base" if config.teacher.mode == "static" else "ema",
        teacher_update_rate=config.teacher.ema_alpha, teacher_sync_steps=1,
        distillation_mode="full_logits" if objective.targets == "full" else "topk_logits",
        distillation_topk=objective.topk.k, distillation_alpha=0.0, distillation_is_clip=objective.is_clip,
        num_loss_tokens_to_skip=objective.skip_first_n_tokens,
        teacher_prompt_template=trl_teacher_template(config.teacher.template),
        shuffle_dataset=False, seed=config.seed, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )


class TrlColumn(Column):
    """SDFTTrainer.train() for warmup + repeats steps in a background thread; a TrainerCallback holds each
    step at its beginning until `step()` releases it, and times it (sampling ends when the trainer's
    on_self_distillation_batch_prepared event fires)."""

    def __init__(self, args):
        super().__init__(args)
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl.experimental.sdft import SDFTTrainer

        column, pad = self, self.tokenizer.pad_token_id
        self._go, self._out = queue.Queue(), queue.Queue()

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.current = {}

            def on_step_begin(self, args, state, control, **kwargs):
                column._go.get()
                self.current = {"begin": time.perf_counter()}

            def on_self_distillation_batch_prepared(self, args, state, control, prompt_ids=None,
                                                    completion_ids=None, teacher_attention_mask=None, **kwargs):
                completion = int((completion_ids != pad).sum())
                self.current.update(sampled=time.perf_counter(), completion_tokens=completion,
                                    processed_tokens=int((prompt_ids != pad).sum()) + completion
                                    + int(teacher_attention_mask.sum()))

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.current["pre_optimizer"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                c, end = self.current, time.perf_counter()
                column._out.put({"sample_s": c["sampled"] - c["begin"], "teacher_s": float("nan"),
                                 "student_s": c["pre_optimizer"] - c["sampled"],
                                 "optimizer_s": end - c["pre_optimizer"], "total_s": end - c["begin"],
                                 "completion_tokens": c["completion_tokens"],
                                 "processed_tokens": c["processed_tokens"]})

        student = self.config.student
        dataset = Dataset.from_list([{"prompt": [dict(m) for m in e.messages], "privileged_context": e.demonstration}
                                     for e in self.examples])
        self._output_dir = tempfile.TemporaryDirectory(prefix="bench_step_trl_")
        peft_config = LoraConfig(r=student.lora_rank, lora_alpha=student.lora_alpha, lora_dropout=student.lora_dropout,
                                 target_modules=list(student.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        self.trainer = SDFTTrainer(model=self.model, args=trl_config(self.config, args, self._output_dir.name),
                                   train_dataset=dataset, processing_class=self.tokenizer, peft_config=peft_config)
        self.trainer.add_callback(StepTimer())  # after the trainer's own callbacks: an EMA update is in the step
        self._thread = threading.Thread(target=self._train, name="trl-train", daemon=True)
        self._thread.start()

    def _train(self) -> None:
        import torch

        try:
            if self.args.threads:
                torch.set_num_threads(self.args.threads)
            self.trainer.train()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting step()
            self._out.put(error)

    def step(self, **extra) -> dict:
        self._go.put(extra)
        result = self._out.get()
        if isinstance(result, BaseException):
            raise RuntimeError(f"TRL SDFTTrainer failed: {type(result).__name__}: {result}") from result
        return result

    def finish(self) -> dict:
        self._thread.join(timeout=600)
        self._output_dir.cleanup()
        return super().finish()


COLUMN_CLASSES = {"sdft": SdftColumn, "sft": SftColumn, "sft_len": SftColumn, "trl": TrlColumn}


def trl_unavailable_reason() -> str | None:
    """None when trl.experimental.sdft imports, else why not."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return TRL_MISSING
    try:
        import trl.experimental.sdft  # noqa: F401
    except ImportError as error:
        return f"TRL's SDFTTrainer does not import (needs trl>=1.16): {type(error).__name__}: {error}"
    return None


# ------------------------------------------------------------------------------------------- workers
def serve_worker(column: str, args) -> None:
    """The worker subprocess: build the column, then answer `step <json>` and `finish` lines on stdin with
    protocol lines on stdout."""
    def reply(kind: str, payload) -> None:
        sys.stdout.write(f"{_TAG}{kind} {json.dumps(payload)}\n")
        sys.stdout.flush()

    try:
        worker = COLUMN_CLASSES[column](args)
        reply("ready", {})
        for line in sys.stdin:
            command, _, payload = line.strip().partition(" ")
            if command == "step":
                result = worker.step(**json.loads(payload or "{}"))
                _release_memory()
                reply("result", result)
            elif command == "finish":
                reply("final", worker.finish())
                return
    except Exception as error:  # noqa: BLE001 - reported to the parent
        reply("error", f"{type(error).__name__}: {error}")
        raise


class RemoteColumn:
    """A column in a worker subprocess (`--worker NAME`), driven over its stdin and stdout."""

    def __init__(self, column: str, args):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", column, "--model", args.model,
                "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                "--warmup", str(args.warmup), "--targets", args.targets, "--topk", str(args.topk),
                "--teacher", args.teacher, "--lora-rank", str(args.lora_rank), "--seed", str(args.seed)]
        for flag, value in (("--data", args.data), ("--micro-batch-size", args.micro_batch_size),
                            ("--threads", args.threads)):
            if value:
                argv += [flag, str(value)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env)
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


# ------------------------------------------------------------------------------------------- results
def summarize(steps: list[dict], memory: dict) -> dict:
    """Medians over the timed steps (throughputs: medians of the per-step rates) and the peak memory rise."""
    out = {key: statistics.median(s[key] for s in steps) for key, _, _ in ROWS[:7]}
    out["completion_tok_s"] = statistics.median(s["completion_tokens"] / s["total_s"] for s in steps)
    out["processed_tok_s"] = statistics.median(s["processed_tokens"] / s["total_s"] for s in steps)
    out["peak_rise_mib"] = memory.get("peak_rise_mib", float("nan"))
    return out


def format_table(summaries: dict[str, dict], notes: dict[str, str]) -> str:
    """A markdown table: one row per metric, one column per trainer ("-": not measured separately,
    "n/a": the column did not run, see its note)."""
    columns = [c for c in COLUMNS if c in summaries or c in notes]
    lines = ["| | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key, title, fmt in ROWS:
        cells = []
        for c in columns:
            value = summaries.get(c, {}).get(key)
            if c not in summaries:
                cells.append("n/a")
            elif value is None or value != value:
                cells.append("-")
            else:
                cells.append(fmt.format(value))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_ratios(steps: dict[str, list[dict]], numerator: str, denominator: str) -> list[float]:
    """Step-time ratio numerator / denominator of every timed round that both columns completed."""
    pairs = zip(steps.get(numerator, []), steps.get(denominator, []))
    return [a["total_s"] / b["total_s"] for a, b in pairs]


def ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """Step-time ratios of the median steps (and TRL's per completion token)."""
    out, sdft = {}, summaries.get("sdft")
    if sdft is None:
        return out
    for column in ("sft", "sft_len"):
        if column in summaries:
            out[f"sdft/{column}"] = sdft["total_s"] / summaries[column]["total_s"]
    if "trl" in summaries:
        out["trl/sdft"] = summaries["trl"]["total_s"] / sdft["total_s"]
        out["trl/sdft per completion token"] = sdft["completion_tok_s"] / summaries["trl"]["completion_tok_s"]
    return out


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
    """Stop a worker subprocess (if the column runs in one) and, unless `keep`, forget the column."""
    worker = workers[column] if keep else workers.pop(column)
    if isinstance(worker, RemoteColumn):
        worker.close()


def run_benchmark(args) -> dict:
    """Start every column, run the warm-up and timed rounds in lockstep, print and return the results:
    {"summaries", "notes", "ratios", "round_ratios", "table", "steps", "memory", "settings"}."""
    start = time.perf_counter()
    settings = (f"{args.model}, {args.prompts} prompts x {args.new_tokens} new tokens, LoRA rank {args.lora_rank}, "
                f"fp32, {args.targets} forward KL, {args.teacher} teacher, {args.warmup} warm-up + {args.repeats} "
                f"timed steps per column; data: {data_source(args)}; {machine(args.threads)}")
    print(f"bench_step: {settings}; {load_average()} at the start", flush=True)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5 and not args.threads:
        print("note: the machine is busy; torch threads oversubscribed by other processes can slow every column "
              "many times over: consider --threads 1", flush=True)
    workers, notes, steps, memory = {}, {}, {}, {}
    for column in args.columns:
        if column == "trl":
            reason = trl_unavailable_reason()
            if reason is not None:
                notes[column] = reason
                print(reason, flush=True)
                continue
        if column == "sft_len" and "sdft" not in args.columns:
            notes[column] = "needs the SDFT column (its completion lengths)"
            continue
        t0 = time.perf_counter()
        try:
            workers[column] = (COLUMN_CLASSES[column](args) if args.in_process else RemoteColumn(column, args))
        except Exception as error:  # noqa: BLE001 - a failing column is reported, not fatal
            notes[column] = f"failed to start: {error}"
            print(f"  {COLUMN_TITLES[column]}: {notes[column]}", flush=True)
            continue
        steps[column] = []
        print(f"  {COLUMN_TITLES[column]}: ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    last_sdft: dict = {}  # the SDFT column runs first in every round
    try:
        for round_index in range(args.warmup + args.repeats):
            others = [c for c in COLUMNS if c in workers and c != "sdft"]
            shift = round_index % max(1, len(others))
            order = (["sdft"] if "sdft" in workers else []) + others[shift:] + others[:shift]
            timed = round_index >= args.warmup
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
                    print(f"  {COLUMN_TITLES[column]}: {notes[column]}", flush=True)
                    continue
                if column == "sdft":
                    last_sdft = result
                if timed:
                    steps[column].append(result)
                parts = ", ".join(f"{key[:-2]} {result[key]:.2f}" for key in ("sample_s", "teacher_s", "student_s")
                                  if result[key] == result[key])
                print(f"  round {round_index + 1}{'' if timed else ' (warm-up)'} {COLUMN_TITLES[column]}: "
                      f"{result['total_s']:.2f} s ({parts}), {result['completion_tokens']:.0f} completion tokens",
                      flush=True)
        for column, worker in workers.items():
            memory[column] = worker.finish()
    finally:
        for column in list(workers):
            _drop(workers, column, keep=True)

    summaries = {c: summarize(steps[c], memory.get(c, {})) for c in workers if steps.get(c)}
    table = format_table(summaries, notes)
    rows = ratios(summaries)
    print()
    print(table)
    print()
    if "sdft/sft" in rows or "sdft/sft_len" in rows:
        print(f"SDFT / SFT step time: {rows.get('sdft/sft', float('nan')):.2f}x (demonstration targets), "
              f"{rows.get('sdft/sft_len', float('nan')):.2f}x (targets as long as the completions); "
              "goal <= 2.5x, the paper reports about 4x")
    if "trl/sdft" in rows:
        print(f"TRL SDFTTrainer / SDFT step time: {rows['trl/sdft']:.2f}x "
              f"({rows['trl/sdft per completion token']:.2f}x per completion token)")
    per_round = {}
    for numerator, denominator in (("sdft", "sft"), ("sdft", "sft_len"), ("trl", "sdft")):
        if numerator in summaries and denominator in summaries:
            per_round[f"{numerator}/{denominator}"] = values = round_ratios(steps, numerator, denominator)
            print(f"{numerator}/{denominator} round by round: " + ", ".join(f"{r:.2f}x" for r in values))
    for column, note in notes.items():
        print(f"{COLUMN_TITLES[column]}: {note}")
    if any(not m.get("peak_reset", True) for m in memory.values()):
        print("note: the peak RSS could not be reset after loading; peaks may include the loading transient")
    if args.in_process and len(summaries) > 1:
        print("note: --in-process: all columns share one process, so a peak RSS rise includes earlier columns")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s; {load_average()} at the end", flush=True)
    out = {"summaries": summaries, "notes": notes, "ratios": rows, "round_ratios": per_round, "table": table,
           "steps": steps, "memory": memory, "settings": settings}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        serve_worker(args.worker, args)
        return None
    return run_benchmark(args)


if __name__ == "__main__":
    main()
