"""One trainer per column of a step benchmark, each holding its own model: the SDFT step
(`sdft.loop.sdft_step_fn`) and the SFT step (`sdft.sft.sft_step_fn`) on the local backend.

`column.step(**extra)` runs and times one optimizer step and returns its measurements in seconds:
sample_s, teacher_s, student_s (forward+backward), optimizer_s, total_s (the whole step, timed around it
after the device finished), completion_tokens, processed_tokens (tokens of the training forward passes),
and on a GPU peak_gib. `column.finish()` returns the memory figures: on a CPU the rise of the process's peak
RSS over its RSS after loading the model (MiB); on a GPU the memory the column holds between steps (model,
optimizer, teacher) and its peak during a step, both over what was allocated before it was built (GiB).
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
import time

import torch

from sdft.bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes, synchronize
from sdft.bench.settings import StepSettings, step_config

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def data_source(settings: StepSettings) -> str:
    from sdft.data import QUICKSTART_DIR

    if settings.data:
        return settings.data
    return "package:quickstart/train.jsonl" if (QUICKSTART_DIR / "train.jsonl").is_file() else "built-in prompts"


def bench_examples(settings: StepSettings):
    """`settings.prompts` PromptExamples: from settings.data, the quickstart train.jsonl, or INLINE_PROMPTS
    (cycled)."""
    from pathlib import Path

    from sdft.data import QUICKSTART_DIR, PromptExample, load_jsonl_examples

    path = Path(settings.data) if settings.data else QUICKSTART_DIR / "train.jsonl"
    if settings.data or path.is_file():
        pool = load_jsonl_examples(path)
    else:
        pool = [PromptExample(id=f"built-in/{i}", messages=({"role": "user", "content": q},), demonstration=a,
                              answer=a) for i, (q, a) in enumerate(INLINE_PROMPTS)]
    return [pool[i % len(pool)] for i in range(settings.prompts)]


class StepBackend:
    """A backend as a step benchmark sees it: attributes are forwarded; after every method call the device
    is synchronized (so that the loop's host-clock phase times include the device work queued in the phase),
    and the rollouts of the last `sample` call are kept."""

    def __init__(self, backend, device: torch.device):
        self.backend, self.device, self.rollouts = backend, device, []

    def __getattr__(self, name):
        attribute = getattr(self.backend, name)
        if not inspect.ismethod(attribute):
            return attribute

        def call(*args, **kwargs):
            out = attribute(*args, **kwargs)
            synchronize(self.device)
            if name == "sample":
                self.rollouts = out
            return out
        return call


class MemoryProbe:
    """CPU: peak RSS rise over the RSS after loading (`loaded`); CUDA: allocator figures over what was
    allocated when the probe was made (before the column's model)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_reset = True
        self.step_peaks: list[float] = []
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(device)

    def loaded(self) -> None:
        """The model is loaded: the CPU baseline."""
        if self.device.type != "cuda":
            self.peak_reset = reset_peak_rss()
            self.loaded_rss = rss_bytes()

    def built(self) -> None:
        """The backend is built: on CUDA, what the column holds between steps."""
        if self.device.type == "cuda":
            synchronize(self.device)
            self.resident = torch.cuda.memory_allocated(self.device) - self.base

    def before_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def after_step(self) -> dict:
        if self.device.type != "cuda":
            return {}
        peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30
        self.step_peaks.append(peak)
        return {"peak_gib": peak}

    def figures(self) -> dict:
        if self.device.type == "cuda":
            return {"resident_gib": self.resident / 2**30,
                    "peak_gib": max(self.step_peaks) if self.step_peaks else float("nan")}
        return {"loaded_rss_mib": self.loaded_rss / 2**20, "peak_rise_mib": max(0, peak_rss_bytes() - self.loaded_rss) / 2**20,
                "peak_reset": self.peak_reset}


class Column(abc.ABC):
    """One trainer at the benchmark's settings. The model is loaded here (in the settings' dtype, onto
    `device`) and the prompts encoded; subclasses build the backend and the step function."""

    def __init__(self, settings: StepSettings, *, steps: int, device: str = "cpu", threads: int | None = None):
        from sdft.batches import encode_examples
        from sdft.models import load_model_and_tokenizer
        from sdft.runner import seed_everything

        if threads:
            torch.set_num_threads(threads)
        self.settings, self.device = settings, torch.device(device)
        self.config = config = step_config(settings)
        self.examples = bench_examples(settings)
        self.memory = MemoryProbe(self.device)
        seed_everything(config.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model.name, dtype=DTYPES[config.model.dtype], device=self.device, cache_dir=config.model.cache_dir)
        self.batch = encode_examples(self.tokenizer, self.examples, template=config.teacher.template,
                                     max_prompt_tokens=config.data.max_prompt_tokens)
        self.memory.loaded()
        self.steps, self.steps_done = steps, 0

    def attach_local_backend(self) -> None:
        """The local backend (`sdft.backends.build_backend`) for the column's steps, as `self.backend`."""
        from sdft.backends import build_backend

        backend = build_backend(self.config, steps=self.steps, device=self.device, model=self.model,
                                tokenizer=self.tokenizer)
        self.backend = StepBackend(backend, self.device)
        self.memory.built()

    def step(self, **extra) -> dict:
        """Run and time one optimizer step of this column."""
        self.steps_done += 1
        self.memory.before_step()
        synchronize(self.device)
        start = time.perf_counter()
        result = self.run_step(**extra)
        synchronize(self.device)
        result.setdefault("total_s", time.perf_counter() - start)
        result.update(self.memory.after_step())
        return result

    @abc.abstractmethod
    def run_step(self, **extra) -> dict:
        """One step: its measurements (total_s too where the column times the step itself)."""

    def finish(self) -> dict:
        return self.memory.figures()


class SdftColumn(Column):
    def __init__(self, settings: StepSettings, **options):
        from sdft.loop import sdft_step_fn

        super().__init__(settings, **options)
        self.attach_local_backend()
        self.step_fn = sdft_step_fn(self.config)

    def run_step(self, **extra) -> dict:
        m = self.step_fn(self.backend, self.batch, self.steps_done)
        lengths = [len(r.completion_ids) for r in self.backend.rollouts]
        completion = sum(lengths)
        accounted = m["sample_time_s"] + m["teacher_time_s"] + m["train_time_s"]
        prompts = sum(len(b.student_ids) + len(b.teacher_ids) for b in self.batch)
        return {"sample_s": m["sample_time_s"], "teacher_s": m["teacher_time_s"],
                "student_s": m["train_time_s"] - m["optimizer_time_s"],
                "optimizer_s": m["optimizer_time_s"] + (m["step_time_s"] - accounted),  # + the teacher update
                "completion_tokens": completion, "processed_tokens": prompts + 2 * completion,
                "completion_lengths": lengths,
                "finished": sum(bool(r.finished) for r in self.backend.rollouts)}


class SftColumn(Column):
    """SFT steps; `step(target_lengths=[L_1, ...])` cuts or cycles target i to L_i tokens (at least 1): SFT on
    exactly the token counts, and so the padding, of another column's completions."""

    def __init__(self, settings: StepSettings, **options):
        from sdft.sft import sft_step_fn

        super().__init__(settings, **options)
        self.attach_local_backend()
        self.step_fn = sft_step_fn(self.config)

    def step(self, **extra) -> dict:
        """As `Column.step`; the forward+backward time is the step's time less the optimizer's where the
        backend reports it separately (else it includes the optimizer)."""
        result = super().step(**extra)
        optimizer = result["optimizer_s"]
        result["student_s"] = result["total_s"] - (0.0 if optimizer != optimizer else optimizer)
        return result

    def run_step(self, target_lengths: list[int] | None = None, **extra) -> dict:
        batch = self.batch
        if target_lengths is not None:
            batch = [dataclasses.replace(b, target_ids=tuple(b.target_ids[i % len(b.target_ids)]
                                                             for i in range(max(1, length))))
                     for b, length in zip(batch, target_lengths)]
        m = self.step_fn(self.backend, batch, self.steps_done)
        targets = sum(len(b.target_ids) for b in batch)
        optimizer = m.get("optimizer_time_s")
        return {"sample_s": float("nan"), "teacher_s": float("nan"),
                "optimizer_s": float("nan") if optimizer is None else optimizer,
                "completion_tokens": targets, "processed_tokens": sum(len(b.student_ids) for b in batch) + targets,
                "completion_lengths": [len(b.target_ids) for b in batch]}
