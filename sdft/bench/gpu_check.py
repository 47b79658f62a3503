"""The prepared GPU check: three parts in one run, each within its own time budget, written to one folder.

1. accuracy  `loss_accuracy` at N=8192, H=4096, V=151936 in bf16: every fused path must be no worse than
             naive bf16 PyTorch against float64 truth (a worse path is a failure);
2. losses    `loss_speed` at the shapes of the published anchors (N=8192, H=4096, V=151936 and V=128256):
             forward KL without and with the weight gradient, JSD(0.5) with it, top-K=20 distillation and
             the teacher top-K; naive PyTorch, chunked, Triton and Liger-Kernel (skipped with the reason when
             it does not import); medians of CUDA-event timings, peak extra memory, fraction of the bf16
             matmul rate measured in the same run; then the `goals` table;
3. steps     a randomly initialized Qwen2.5-1.5B-shaped model (built in-process, saved with the synthetic
             tokenizer to a temporary folder that `model.name` points at), bf16, LoRA and full fine-tuning:
             one SDFT step beside one SFT step on the same token counts (`step_compare`).

An item (a loss, a path, a training mode) starts only while its part's budget, and the whole run's, covers
what the previous item of its kind took; what does not fit is recorded as skipped, with the reason. A part or
item that raises is recorded as failed and the run goes on. After each part, `gpu_check.json` (everything
measured) and `gpu_check.md` (the tables) are rewritten in the output folder, and progress lines are appended
to `gpu_check.log`, so an interrupted run leaves what it finished. `run_check` returns the exit status: 0, or
1 when anything failed. The tiny plan runs the same code on a CPU in seconds (tiny shapes and model; the
Triton path under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import gc
import importlib.metadata
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from sdft.bench import goals as goal_table
from sdft.bench import loss_accuracy as accuracy
from sdft.bench import loss_speed as speed
from sdft.bench.availability import liger_unavailable_reason, triton_unavailable_reason
from sdft.bench.budget import Budget
from sdft.bench.settings import StepSettings
from sdft.bench.synthetic import QWEN2_5_1_5B, TINY_QWEN2, ModelShape, save_random_qwen2
from sdft.io import atomic_write_json, atomic_write_text

PARTS = ("accuracy", "losses", "steps")
LOSS_SPECS = (  # in the order of importance: what a short budget leaves out comes last
    speed.LossSpec("kl", "kl", "lora", "forward"),
    speed.LossSpec("kl", "kl", "full", "forward"),
    speed.LossSpec("topk", "topk", "lora"),
    speed.LossSpec("jsd", "kl", "full", "jsd"),
    speed.LossSpec("teacher_topk", "teacher_topk", "-"),
)
ANCHOR_SPECS = LOSS_SPECS[:2]  # the Liger anchor's shape: forward KL only
LOSS_IMPLS = ("naive", "chunked", "triton", "liger")
JSON_NAME, MARKDOWN_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"


@dataclass(frozen=True)
class CheckPlan:
    """What the check runs and how long each part may take (seconds)."""
    device: str
    accuracy_case: tuple = ("qwen7b",) + accuracy.CASES["qwen7b"]
    dtype: str = "bfloat16"
    loss_cases: tuple = (("qwen7b",) + speed.CASES["qwen7b"] + (LOSS_SPECS,),
                         ("llama8b",) + speed.CASES["llama8b"] + (ANCHOR_SPECS,))
    goal_case: str = "qwen7b"
    warmup: int = 3
    iters: int = 10
    rotate: int = 3
    model: ModelShape = QWEN2_5_1_5B
    step_modes: tuple = ("lora", "full")
    step: StepSettings = StepSettings(prompts=16, new_tokens=256, teacher="ema", dtype="bfloat16", lr=1e-5)
    step_warmup: int = 1
    step_repeats: int = 2
    budgets: dict = field(default_factory=lambda: {"accuracy": 130.0, "losses": 150.0, "steps": 150.0})
    total_budget: float = 450.0


def full_plan() -> CheckPlan:
    """The H200 plan: the real shapes, about 8 minutes in all."""
    return CheckPlan(device="cuda")


def tiny_plan() -> CheckPlan:
    """The same parts on a CPU at tiny shapes (seconds; budgets that a slow CPU does not reach)."""
    return CheckPlan(
        device="cpu", accuracy_case=("tiny",) + accuracy.TINY_CASES["tiny"],
        loss_cases=(("tiny",) + speed.TINY_CASES["tiny"] + (LOSS_SPECS,),), goal_case="tiny",
        warmup=0, iters=1, rotate=1, model=TINY_QWEN2,
        step=StepSettings(prompts=2, new_tokens=8, teacher="ema", dtype="bfloat16", lr=1e-5),
        step_warmup=1, step_repeats=1, budgets={part: 3600.0 for part in PARTS}, total_budget=3 * 3600.0)


def with_budgets(plan: CheckPlan, budgets: dict[str, float], total: float | None) -> CheckPlan:
    """`plan` with some part budgets (and the whole run's) replaced."""
    unknown = sorted(set(budgets) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown} in the budgets; allowed: {', '.join(PARTS)}")
    return replace(plan, budgets={**plan.budgets, **budgets},
                   total_budget=plan.total_budget if total is None else total)


# --------------------------------------------------------------------------------------------- the parts
def accuracy_part(plan: CheckPlan, budget: Budget, log) -> tuple[dict, list[str]]:
    device = torch.device(plan.device)
    name, n, h, v = plan.accuracy_case
    impls = [i for i in accuracy.FUSED_IMPLS if i != "triton" or triton_unavailable_reason(device) is None]
    notes = [] if "triton" in impls else [f"triton left out: {triton_unavailable_reason(device)}"]
    for note in notes:
        log(note)
    log(accuracy.TABLE_HEADER)
    start = time.perf_counter()
    rows = accuracy.check_case(name, n, h, v, dtype=getattr(torch, plan.dtype), device=device, impls=impls,
                               budget=budget, log=log)
    log(accuracy.summary_line(rows, time.perf_counter() - start))
    failures = [f"accuracy: {r['loss']} {r['path']} is less accurate than naive PyTorch"
                + (f" ({r['note']})" if r.get("note") else "") for r in accuracy.failed_rows(rows)]
    return {"case": {"name": name, "n": n, "h": h, "v": v, "dtype": plan.dtype}, "impls": impls, "notes": notes,
            "rows": rows}, failures


def losses_part(plan: CheckPlan, budget: Budget, log) -> tuple[dict, list[str]]:
    device = torch.device(plan.device)
    log(speed.TABLE_HEADER)
    matmul, rows, notes = {}, [], []
    for name, n, h, v, specs in plan.loss_cases:
        if budget.left() <= 0:
            notes.append(f"case {name} {budget.skip_note()}")
            log(notes[-1])
            continue
        matmul[name], case_rows = speed.run_case(
            name, n, h, v, list(specs), LOSS_IMPLS, device=device, dtype=getattr(torch, plan.dtype),
            warmup=plan.warmup, iters=plan.iters, rotate=plan.rotate, budget=budget, log=log)
        rows += case_rows
    results = goal_table.evaluate(rows, plan.goal_case) if plan.goal_case in matmul else []
    if results:
        log(goal_table.format_results(results))
    failures = [f"losses: {r['case']} {r['loss']} ({r['mode']}) {r['impl']}: {r['note']}"
                for r in speed.failed_rows(rows)]
    return {"cases": [{"name": c[0], "n": c[1], "h": c[2], "v": c[3]} for c in plan.loss_cases],
            "matmul": matmul, "rows": rows, "goals": results, "notes": notes}, failures


def steps_part(plan: CheckPlan, budget: Budget, log) -> tuple[dict, list[str]]:
    from sdft.bench.step_compare import compare_steps

    out: dict = {"model": {**asdict(plan.model), "parameters": plan.model.parameters()},
                 "settings": asdict(plan.step), "warmup": plan.step_warmup, "repeats": plan.step_repeats,
                 "modes": {}}
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as folder:
        start = time.perf_counter()
        save_random_qwen2(folder, plan.model, seed=plan.step.seed, dtype=getattr(torch, plan.step.dtype),
                          device=plan.device)
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        out["build_s"] = time.perf_counter() - start
        log(f"random Qwen2 model of {_count(plan.model.parameters())} parameters built and saved in "
            f"{out['build_s']:.0f} s")
        for mode in plan.step_modes:
            if not budget.allows("mode"):
                out["modes"][mode] = {"note": budget.skip_note("mode")}
                log(f"{mode}: {out['modes'][mode]['note']}")
                continue
            log(f"{mode}: SDFT step, then SFT step on the same token counts")
            start = time.perf_counter()
            try:
                result = compare_steps(replace(plan.step, model=folder, student=mode), device=plan.device,
                                       warmup=plan.step_warmup, repeats=plan.step_repeats, log=log)
            except Exception as error:  # noqa: BLE001 - recorded; the other mode still runs
                out["modes"][mode] = {"note": f"failed: {type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc()}
                failures.append(f"steps: {mode}: {type(error).__name__}: {error}")
                log(f"{mode}: {out['modes'][mode]['note']}")
            else:
                result["seconds"] = time.perf_counter() - start
                out["modes"][mode] = result
                log(result["table"])
                log(f"{mode}: SDFT / SFT step time {result['ratio']:.2f}x (steps: "
                    + ", ".join(f"{r:.2f}x" for r in result["round_ratios"]) + ")")
                if not result["equal_tokens"]:
                    failures.append(f"steps: {mode}: the SFT steps did not train on the SDFT steps' token counts")
            gc.collect()  # a failed column's model and optimizer were held by its traceback until here
            if plan.device == "cuda":
                torch.cuda.empty_cache()
            budget.record("mode", time.perf_counter() - start)
    return out, failures


PART_FUNCTIONS = {"accuracy": accuracy_part, "losses": losses_part, "steps": steps_part}


# --------------------------------------------------------------------------------------------- the run
def environment(device: torch.device) -> dict:
    """What ran the check: device name, versions of the packages the numbers depend on, date."""
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for package in ("torch", "triton", "transformers", "peft", "liger-kernel"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    info["liger"] = liger_unavailable_reason() or "importable"
    return info


def run_check(plan: CheckPlan, out_dir: str | Path, *, parts=PARTS,
              echo: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    """Run `parts` of `plan`, writing the results folder after each; returns 1 if anything failed, else 0."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; allowed: {', '.join(PARTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    log_path.write_text("")

    def log(line: str) -> None:
        echo(line)
        with open(log_path, "a") as handle:
            handle.write(line + "\n")

    whole = Budget(plan.total_budget)
    device = torch.device(plan.device)
    results = {"environment": environment(device), "plan": _plan_dict(plan), "parts": {}, "failures": []}
    log(f"gpu_check on {results['environment']['device']}: parts {', '.join(parts)}; budgets "
        + ", ".join(f"{p} {plan.budgets[p]:.0f} s" for p in parts) + f", {plan.total_budget:.0f} s in all")
    for part in parts:
        seconds = min(plan.budgets[part], max(whole.left(), 0.0))
        log(f"\n## {part} (budget {seconds:.0f} s)")
        start = time.perf_counter()
        try:
            data, failures = PART_FUNCTIONS[part](plan, Budget(seconds), log)
            data["status"] = "failed" if failures else "ok"
        except Exception as error:  # noqa: BLE001 - recorded; the next part still runs
            data = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()}
            failures = [f"{part}: {type(error).__name__}: {error}"]
            log(data["traceback"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        data["seconds"] = time.perf_counter() - start
        data["budget_s"] = seconds
        results["parts"][part] = data
        results["failures"] += failures
        results["seconds"] = whole.elapsed()
        write_results(out_dir, results)
        log(f"{part}: {data['status']} in {data['seconds']:.0f} s")
    log(f"\ngpu_check: {'FAILED: ' + '; '.join(results['failures']) if results['failures'] else 'no failures'}; "
        f"{whole.elapsed():.0f} s in all; results in {out_dir}")
    return 1 if results["failures"] else 0


def _plan_dict(plan: CheckPlan) -> dict:
    out = asdict(plan)
    out["loss_cases"] = [{"name": c[0], "n": c[1], "h": c[2], "v": c[3], "losses": [asdict(s) for s in c[4]]}
                         for c in plan.loss_cases]
    return out


def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_json(out_dir / JSON_NAME, results)
    atomic_write_text(out_dir / MARKDOWN_NAME, markdown_report(results))


# --------------------------------------------------------------------------------------------- markdown
def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None or value != value else f"{value:{spec}}{unit}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n:,}"


def markdown_report(results: dict) -> str:
    env, parts = results["environment"], results["parts"]
    lines = ["# GPU check", "",
             f"{env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, liger-kernel {env['liger-kernel'] or '-'} ({env['liger']}); {env['date']}; "
             f"{_fmt(results.get('seconds'), '.0f', ' s')} in all.", ""]
    if "accuracy" in parts:
        lines += _accuracy_section(parts["accuracy"])
    if "losses" in parts:
        lines += _losses_section(parts["losses"])
    if "steps" in parts:
        lines += _steps_section(parts["steps"])
    lines += ["## Failures", ""] + ([f"- {f}" for f in results["failures"]] or ["none"])
    return "\n".join(lines) + "\n"


def _part_header(title: str, part: dict) -> list[str]:
    status = part["status"] + (f": {part['error']}" if part.get("error") else "")
    return [f"## {title}", "", f"Status: {status}; {_fmt(part.get('seconds'), '.0f', ' s')} "
                               f"(budget {_fmt(part.get('budget_s'), '.0f', ' s')}).", ""]


def _accuracy_section(part: dict) -> list[str]:
    lines = _part_header("1. Accuracy against float64 truth", part)
    if "rows" not in part:
        return lines
    case = part["case"]
    lines += [f"N={case['n']}, H={case['h']}, V={case['v']}, inputs {case['dtype']}; relative errors "
              "||x - x*|| / ||x*||; a fused path passes when no error exceeds naive PyTorch's (logits in the "
              "input dtype).", ""] + [f"- {note}" for note in part["notes"]]
    lines += ["", accuracy.TABLE_HEADER] + [accuracy.format_row(r) for r in part["rows"]] + [""]
    return lines


def _losses_section(part: dict) -> list[str]:
    lines = _part_header("2. Loss benchmark", part)
    if "rows" not in part:
        return lines
    lines += ["Forward+backward, reduction token_mean, median of CUDA-event timings; extra memory = peak "
              "allocated during one step over the inputs (the gradients it returns included); of matmul rate = (GEMMs the loss needs x one "
              "[N,H]x[H,V] matmul's time) / the path's time. Modes: lora = gradient for the hidden states "
              "only, full = also the output-layer weight.", ""]
    lines += [f"- matmul unit, {name}: {m['ms']:.2f} ms ({m['tflops']:.0f} TFLOP/s)" for name, m in part["matmul"].items()]
    lines += [f"- {note}" for note in part["notes"]]
    lines += ["", "| case | loss | mode | path | ms | extra GB | of matmul rate | loss value | note |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in part["rows"]:
        extra = None if r["extra_gib"] is None else r["extra_gib"] * 2**30 / goal_table.GB
        frac = None if r["floor_fraction"] is None else 100 * r["floor_fraction"]
        lines.append(f"| {r['case']} | {r['loss']} | {r['mode']} | {r['impl']} | {_fmt(r['ms'], '.1f')} | "
                     f"{_fmt(extra, '.2f')} | {_fmt(frac, '.0f', '%')} | {_fmt(r.get('value'), '.5g')} | "
                     f"{r['note']} |")
    if part["goals"]:
        lines += ["", f"Goals, at case {part['goals'][0]['case']} ({goal_table.GOALS_SETTING}):", "",
                  goal_table.format_results(part["goals"])]
    return lines + [""]


def _steps_section(part: dict) -> list[str]:
    lines = _part_header("3. One SDFT step and one SFT step on the same token counts", part)
    if "modes" not in part:
        return lines
    model, s = part["model"], part["settings"]
    lines += [f"Random Qwen2 model: hidden {model['hidden']}, {model['layers']} layers, {model['heads']} heads, "
              f"{model['kv_heads']} KV heads, intermediate {model['intermediate']}, vocabulary {model['vocab']}, "
              f"tied embeddings ({_count(model['parameters'])} parameters), {s['dtype']}; built and saved in "
              f"{_fmt(part.get('build_s'), '.0f', ' s')}. {s['prompts']} prompts per step, one completion each of "
              f"up to {s['new_tokens']} new tokens, full-vocabulary forward KL, {s['teacher']} teacher, LoRA rank "
              f"{s['lora_rank']}; {part['warmup']} warm-up + {part['repeats']} timed steps per column, medians. "
              "SFT target i has the length of SDFT completion i of the same step.", ""]
    for mode, result in part["modes"].items():
        lines.append(f"### {'LoRA' if mode == 'lora' else 'Full fine-tuning'}")
        lines.append("")
        if "table" not in result:
            lines += [result["note"], ""]
            continue
        lines += [result["table"], "",
                  f"SDFT / SFT step time: **{result['ratio']:.2f}x** (steps: "
                  + ", ".join(f"{r:.2f}x" for r in result["round_ratios"]) + f"); same token counts: "
                  f"{'yes' if result['equal_tokens'] else 'NO'}; completions ended by EOS: {result['finished']}.", ""]
    return lines
