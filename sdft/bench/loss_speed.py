"""Speed and memory of the distillation-loss paths: naive PyTorch, torch.compile, chunked, Triton, Liger.

For each case (N tokens, hidden size H, vocabulary V, bf16) and each path: forward+backward median time
(CUDA events, after warm-up, cycling through `rotate` sets of hidden states), peak extra memory
(torch.cuda.max_memory_allocated during one step minus what was allocated before it: the inputs; the
gradients the step returns count as extra), the loss
value of that step, and the fraction of the matmul floor, where the floor is (number of 2NHV GEMMs the loss
needs) x (time of one [N,H] x [H,V] bf16 matmul measured in the same run):
  full-vocabulary KL/JSD: 3 GEMMs (student logits, teacher logits, dL/dh), 4 with the weight gradient;
  top-K distillation:     2 GEMMs (student logits, dL/dh), 3 with the weight gradient;
  teacher top-K:          1 GEMM.
Modes: "lora" = gradient for the hidden states only (frozen output layer), "full" = also the weight.
Reduction "token_mean" everywhere. Paths are picked with `impl=` of `sdft.losses`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

import sdft.losses as L
from sdft.bench.availability import liger_unavailable_reason, triton_unavailable_reason
from sdft.bench.budget import Budget
from sdft.bench.loss_accuracy import naive_topk
from sdft.bench.measure import is_out_of_memory, matmul_ms, time_calls

CASES = {
    "qwen7b": (8192, 4096, 151936),    # Qwen2.5-7B output layer
    "llama8b": (8192, 4096, 128256),   # Llama-3-8B output layer
    "h2048": (8192, 2048, 151936),     # Qwen2.5-1.5B/3B-class hidden size
}
TINY_CASES = {"tiny": (48, 40, 300)}
IMPLS = ("naive", "compiled", "chunked", "triton", "liger")
GEMMS = {("kl", "lora"): 3, ("kl", "full"): 4, ("topk", "lora"): 2, ("topk", "full"): 3, ("teacher_topk", "-"): 1}
TABLE_HEADER = ("| case | loss | mode | impl | ms (median) | peak extra GiB | of matmul floor | note |\n"
                "|---|---|---|---|---|---|---|---|")
JSD_BETA = 0.5


@dataclass(frozen=True)
class LossSpec:
    """One benchmarked loss: `label` names its rows; `family` is "kl" (full vocabulary, divergence `kind`),
    "topk" (top-K distillation, renormalize + cross-entropy: the cookbook loss) or "teacher_topk"; `mode`
    is "lora", "full" or "-" (teacher top-K has no gradient)."""
    label: str
    family: str
    mode: str
    kind: str = "forward"

    @property
    def gemms(self) -> int:
        return GEMMS[(self.family, self.mode)]


def script_specs(losses, modes, kind: str) -> list[LossSpec]:
    """The specs of `scripts/bench_losses_gpu.py` in its order: KL per mode (divergence `kind`), then the
    teacher top-K, then top-K distillation per mode."""
    out = [LossSpec("kl", "kl", mode, kind) for mode in modes if "kl" in losses]
    if "teacher_topk" in losses:
        out.append(LossSpec("teacher_topk", "teacher_topk", "-"))
    out += [LossSpec("topk", "topk", mode) for mode in modes if "topk" in losses]
    return out


def make_inputs(n: int, h: int, v: int, rotate: int, device: torch.device, dtype: torch.dtype):
    """Output layers ws, wt [V, H] (teacher = student + perturbation) and `rotate` pairs of hidden states
    (hs [N, H] requiring grad, ht [N, H])."""
    g = torch.Generator(device=device).manual_seed(0)
    ws = (torch.randn(v, h, device=device, generator=g) * h ** -0.5 * 2).to(dtype)
    wt = (ws.float() + 0.2 * torch.randn(v, h, device=device, generator=g) * h ** -0.5).to(dtype)
    sets = []
    for _ in range(rotate):
        hs = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
        ht = (hs.detach().float() + 0.5 * torch.randn(n, h, device=device, generator=g)).to(dtype)
        sets.append((hs, ht))
    return ws, wt, sets


def _max_logit_buffers(n: int, v: int, device: torch.device) -> float:
    """How many fp32 [N, V] buffers fit in the free GPU memory (inf on a CPU)."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return free / (4.0 * n * v)


def kl_steps(sets, ws, wt, impls, spec: LossSpec, device: torch.device) -> dict:
    """impl -> (step(i) returning the loss, or None; note) for a full-vocabulary divergence."""
    n, v = sets[0][0].shape[0], ws.shape[0]
    kind = spec.kind
    ws.requires_grad_(spec.mode == "full")

    def reset(hs):
        hs.grad = None
        ws.grad = None

    def naive_loss(hs, ht):
        return L.kl_divergence(hs @ ws.T, ht @ wt.T, kind=kind, beta=JSD_BETA, reduction="token_mean")

    def backward(loss_fn):
        def step(i):
            hs, ht = sets[i]
            reset(hs)
            out = loss_fn(hs, ht)
            out.backward()
            return out
        return step

    steps = {}
    fits = _max_logit_buffers(n, v, device)
    if "naive" in impls:
        steps["naive"] = (backward(naive_loss), "") if fits > 8 else (None, "does not fit")
    if "compiled" in impls:
        steps["compiled"] = ((backward(torch.compile(naive_loss)), "torch.compile of the reference") if fits > 6
                             else (None, "does not fit"))
    for impl in ("chunked", "triton"):
        if impl not in impls:
            continue
        why = triton_unavailable_reason(device) if impl == "triton" else None
        steps[impl] = (None, why) if why else (backward(
            lambda hs, ht, impl=impl: L.fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=JSD_BETA,
                                                        reduction="token_mean", impl=impl)), "")
    if "liger" in impls:
        why = liger_unavailable_reason()
        if why:
            steps["liger"] = (None, why)
        else:
            from sdft.bench.liger import liger_distill_loss

            loss_fn = liger_distill_loss(kind, JSD_BETA, device)
            labels = torch.randint(0, v, (n,), device=device)
            steps["liger"] = (backward(lambda hs, ht: loss_fn(hs, ws, ht, wt, labels)),
                              "LigerFusedLinearJSDLoss, hard-loss weight 0 (computes dL/dW in every mode)")
    return steps


def topk_steps(sets, ws, targets, impls, spec: LossSpec, device: torch.device) -> dict:
    """impl -> (step(i) or None, note) for top-K distillation (renormalize, cross_entropy)."""
    n, v = sets[0][0].shape[0], ws.shape[0]
    ws.requires_grad_(spec.mode == "full")

    def reset(hs):
        hs.grad = None
        ws.grad = None

    def backward(loss_fn):
        def step(i):
            hs = sets[i][0]
            reset(hs)
            out = loss_fn(hs, *targets[i])
            out.backward()
            return out
        return step

    def naive_loss(hs, ids, lps):
        return L.topk_distill_loss(hs @ ws.T, ids, lps, reduction="token_mean")

    steps = {}
    fits = _max_logit_buffers(n, v, device)
    if "naive" in impls:
        steps["naive"] = (backward(naive_loss), "") if fits > 5 else (None, "does not fit")
    if "compiled" in impls:
        steps["compiled"] = ((backward(torch.compile(naive_loss)), "torch.compile of the reference") if fits > 4
                             else (None, "does not fit"))
    for impl in ("chunked", "triton"):
        if impl not in impls:
            continue
        why = triton_unavailable_reason(device) if impl == "triton" else None
        steps[impl] = (None, why) if why else (backward(
            lambda hs, ids, lps, impl=impl: L.fused_linear_topk_distill_loss(hs, ws, ids, lps,
                                                                             reduction="token_mean", impl=impl)), "")
    if "liger" in impls:
        steps["liger"] = (None, "no top-K loss in Liger")
    return steps


def teacher_topk_steps(sets, wt, impls, k: int, device: torch.device) -> dict:
    """impl -> (step(i) or None, note) for the teacher's top-K ids and log-probs (no gradient)."""
    n, v = sets[0][1].shape[0], wt.shape[0]
    steps = {}
    if "naive" in impls:
        steps["naive"] = ((lambda i: naive_topk(sets[i][1] @ wt.T, k)), "") \
            if _max_logit_buffers(n, v, device) > 3 else (None, "does not fit")
    for impl in ("chunked", "triton"):
        if impl not in impls:
            continue
        why = triton_unavailable_reason(device) if impl == "triton" else None
        steps[impl] = (None, why) if why else ((lambda i, impl=impl: L.fused_linear_topk(sets[i][1], wt, k,
                                                                                          impl=impl)), "")
    return steps


def run_rows(case: str, spec: LossSpec, steps: dict, n_sets: int, mm_ms: float, device: torch.device, *,
             warmup: int, iters: int, clear: Callable[[], None] | None = None, budget: Budget | None = None,
             log: Callable[[str], None] = print) -> list:
    """Measure every path of `steps` (`clear` drops the gradients of earlier calls before the memory
    baseline): rows {case, loss, mode, impl, ms, extra_gib, floor_fraction, value, note}; a path that fails
    (out of memory, an error) or does not fit the budget keeps ms None and says why in its note ("failed:
    ..." for errors)."""
    rows = []
    for impl, (step, note) in steps.items():
        row = {"case": case, "loss": spec.label, "mode": spec.mode, "impl": impl, "ms": None, "extra_gib": None,
               "floor_fraction": None, "value": None, "note": note}
        if step is not None and budget is not None and not budget.allows(impl):
            row["note"] = budget.skip_note(impl)
        elif step is not None:
            start = time.perf_counter()
            try:
                row.update(time_calls(step, n_sets, device, warmup, iters, clear))
                row["floor_fraction"] = spec.gemms * mm_ms / row["ms"]
            except Exception as error:  # noqa: BLE001 - one failing path must not stop the others
                row["note"] = ("out of memory" if is_out_of_memory(error)
                               else f"failed: {type(error).__name__}: {str(error)[:160]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if budget is not None:
                budget.record(impl, time.perf_counter() - start)
        rows.append(row)
        log(format_row(row))
    return rows


def run_case(name: str, n: int, h: int, v: int, specs: list[LossSpec], impls, *, device: torch.device,
             dtype: torch.dtype = torch.bfloat16, topk: int = 20, warmup: int = 3, iters: int = 10,
             rotate: int = 3, budget: Budget | None = None, log: Callable[[str], None] = print) -> tuple[dict, list]:
    """All specs at one shape: ({"ms", "tflops"} of the unit matmul, rows)."""
    ws, wt, sets = make_inputs(n, h, v, rotate, device, dtype)
    mm = matmul_ms(sets[0][1], wt, device, warmup, iters)
    matmul = {"ms": mm, "tflops": 2 * n * h * v / mm / 1e9}
    log(f"| {name} | matmul [{n},{h}]x[{h},{v}] | - | torch | {mm:.2f} | - | {matmul['tflops']:.0f} TFLOP/s | "
        "the floor's unit |")
    rows, targets = [], None

    def clear():
        ws.grad = None
        for hs, _ in sets:
            hs.grad = None
    for spec in specs:
        if spec.family == "kl":
            steps = kl_steps(sets, ws, wt, impls, spec, device)
        elif spec.family == "teacher_topk":
            steps = teacher_topk_steps(sets, wt, impls, topk, device)
        else:
            if targets is None:
                with torch.no_grad():
                    targets = [L.fused_linear_topk(ht, wt, topk, impl="chunked") for _, ht in sets]
            steps = topk_steps(sets, ws, targets, impls, spec, device)
        rows += run_rows(name, spec, steps, len(sets), mm, device, warmup=warmup, iters=iters, clear=clear,
                         budget=budget, log=log)
    del ws, wt, sets, targets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return matmul, rows


def failed_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if str(r.get("note", "")).startswith("failed")]


def format_row(row: dict) -> str:
    ms = "-" if row["ms"] is None else f"{row['ms']:.1f}"
    gib = "-" if row["extra_gib"] is None else f"{row['extra_gib']:.2f}"
    frac = "-" if row["floor_fraction"] is None else f"{100 * row['floor_fraction']:.0f}%"
    return f"| {row['case']} | {row['loss']} | {row['mode']} | {row['impl']} | {ms} | {gib} | {frac} | {row['note']} |"
