#!/usr/bin/env python
"""GPU benchmark of the fused distillation losses: naive PyTorch, torch.compile, chunked, Triton, Liger.

For each case (N tokens, hidden size H, vocabulary V, bf16) and each path: forward+backward median time
(CUDA events, after warm-up, cycling through --rotate sets of hidden states), peak extra memory
(torch.cuda.max_memory_allocated during one step minus what was allocated before it: the inputs), and the
fraction of the matmul floor, where the floor is (number of 2NHV GEMMs the loss needs) x (time of one
[N,H] x [H,V] bf16 matmul measured in the same run):
  full-vocabulary KL: 3 GEMMs (student logits, teacher logits, dL/dh), 4 with the weight gradient;
  top-K distillation: 2 GEMMs (student logits, dL/dh), 3 with the weight gradient;
  teacher top-K:      1 GEMM.
Modes: "lora" = gradient for the hidden states only (frozen output layer), "full" = also the weight.

  python scripts/bench_losses_gpu.py --device cuda                     # the three H100 cases
  python scripts/bench_losses_gpu.py --device cuda --cases qwen7b --json out.json
  python scripts/bench_losses_gpu.py --device cuda --sweep             # Triton tile configurations
  TRITON_INTERPRET=1 python scripts/bench_losses_gpu.py --device cpu --tiny   # smoke test of the logic
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "qwen7b": (8192, 4096, 151936),    # Qwen2.5-7B output layer
    "llama8b": (8192, 4096, 128256),   # Llama-3-8B output layer
    "h2048": (8192, 2048, 151936),     # Qwen2.5-1.5B/3B-class hidden size
}
TINY_CASES = {"tiny": (48, 40, 300)}
IMPLS = ("naive", "compiled", "chunked", "triton", "liger")
GEMMS = {("kl", "lora"): 3, ("kl", "full"): 4, ("topk", "lora"): 2, ("topk", "full"): 3, ("teacher_topk", "-"): 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only with --tiny (smoke test)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test; Triton needs "
                                                       "TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--cases", default=None, help=f"comma list from {', '.join(CASES)} (default: all)")
    p.add_argument("--losses", default="kl,topk,teacher_topk", help="comma list of kl, topk, teacher_topk")
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {', '.join(IMPLS)}")
    p.add_argument("--kind", default="forward", choices=("forward", "reverse", "jsd"), help="KL kind")
    p.add_argument("--topk", type=int, default=20, help="K of the top-K losses")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rotate", type=int, default=3, help="number of hidden-state sets cycled through")
    p.add_argument("--sweep", action="store_true", help="time Triton tile configurations on the first case")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the full cases are GPU-sized)")
    return args


# ----------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, n_sets: int, device, warmup: int, iters: int) -> dict:
    """Median time (ms) of step(i) over iters calls cycling i through the input sets, and peak extra GiB."""
    import torch
    for i in range(warmup):
        step(i % n_sets)
    _sync(device)
    extra_gib = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(0)
        _sync(device)
        extra_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    times = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i % n_sets)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "extra_gib": extra_gib}


def matmul_ms(hidden, weight, device, warmup: int, iters: int) -> float:
    def step(_):
        hidden @ weight.T
    return measure(step, 1, device, warmup, iters)["ms"]


def _is_oom(exc: BaseException) -> bool:
    import torch
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------------------
# the paths
# ----------------------------------------------------------------------------------------------------

def _triton_available(device) -> str | None:
    """None when the Triton path can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU needs TRITON_INTERPRET=1"
    return None


def _dispatcher_has_triton() -> bool:
    return importlib.util.find_spec("sdft.losses.triton_dispatch") is not None


def _liger_kl(kind: str, beta: float):
    """LigerFusedLinearJSDLoss configured as a pure distillation loss, or None when not importable."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearJSDLoss
    liger_beta = {"forward": 0.0, "reverse": 1.0, "jsd": beta}[kind]
    wanted = {"beta": liger_beta, "jsd_beta": liger_beta, "weight_hard_loss": 0.0, "weight_soft_loss": 1.0,
              "temperature": 1.0}
    params = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    return LigerFusedLinearJSDLoss(**{k: v for k, v in wanted.items() if k in params})


def _max_logit_buffers(n: int, v: int, device) -> float:
    """How many fp32 [N, V] buffers fit in the free GPU memory (inf on CPU)."""
    import torch
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return free / (4.0 * n * v)


def kl_steps(sets, ws, wt, args, mode: str, device):
    """name -> (step(i), note) for the full-vocabulary KL in this mode."""
    import torch

    import sdft.losses as L
    from sdft.losses import reference

    n, v = sets[0][0].shape[0], ws.shape[0]
    kind, beta = args.kind, 0.5
    ws.requires_grad_(mode == "full")

    def reset(hs):
        hs.grad = None
        ws.grad = None

    def naive_loss(hs, ht):
        return reference.kl_divergence(hs @ ws.T, ht @ wt.T, kind=kind, beta=beta, reduction="token_mean")

    def run_naive(fn):
        def step(i):
            hs, ht = sets[i]
            reset(hs)
            fn(hs, ht).backward()
        return step

    steps = {}
    fits = _max_logit_buffers(n, v, device)
    if "naive" in args.impls:
        steps["naive"] = (run_naive(naive_loss), "") if fits > 8 else (None, "does not fit")
    if "compiled" in args.impls:
        steps["compiled"] = (run_naive(torch.compile(naive_loss)), "torch.compile of the reference") if fits > 6 \
            else (None, "does not fit")
    if "chunked" in args.impls:
        def chunked(i):
            hs, ht = sets[i]
            reset(hs)
            L.fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, reduction="token_mean", impl="chunked").backward()
        steps["chunked"] = (chunked, "")
    if "triton" in args.impls:
        why = _triton_available(device)
        if why:
            steps["triton"] = (None, why)
        elif _dispatcher_has_triton():
            def triton_api(i):
                hs, ht = sets[i]
                reset(hs)
                L.fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, reduction="token_mean",
                                  impl="triton").backward()
            steps["triton"] = (triton_api, "")
        else:
            from sdft.losses.triton_kl import triton_fused_linear_kl
            scale = torch.full((n,), 1.0 / n, device=device)

            def triton_direct(i):
                hs, ht = sets[i]
                reset(hs)
                _, dh, dw, _ = triton_fused_linear_kl(hs, ws, ht, wt, kind=kind, beta=beta, token_scale=scale,
                                                      need_weight_grad=mode == "full")
                hs.grad = dh.to(hs.dtype)
                if dw is not None:
                    ws.grad = dw.to(ws.dtype)
            steps["triton"] = (triton_direct, "direct call (no dispatcher yet)")
    if "liger" in args.impls:
        loss_fn = _liger_kl(kind, beta) if device.type == "cuda" else None
        if loss_fn is None:
            steps["liger"] = (None, "liger-kernel not importable" if device.type == "cuda" else "CUDA only")
        else:
            labels = torch.randint(0, v, (n,), device=device)

            def liger(i):
                hs, ht = sets[i]
                reset(hs)
                loss_fn(hs, ws, ht, wt, labels).backward()
            steps["liger"] = (liger, "LigerFusedLinearJSDLoss, hard-loss weight 0")
    return steps


def topk_steps(sets, ws, targets, args, mode: str, device):
    """name -> (step(i), note) for the top-K distillation (renormalize, cross_entropy: the cookbook loss)."""
    import torch

    import sdft.losses as L
    from sdft.losses import reference

    n, v = sets[0][0].shape[0], ws.shape[0]
    ws.requires_grad_(mode == "full")

    def reset(hs):
        hs.grad = None
        ws.grad = None

    def naive_loss(hs, ids, lps):
        return reference.topk_distill_loss(hs @ ws.T, ids, lps, reduction="token_mean")

    def run_naive(fn):
        def step(i):
            hs = sets[i][0]
            reset(hs)
            fn(hs, *targets[i]).backward()
        return step

    steps = {}
    fits = _max_logit_buffers(n, v, device)
    if "naive" in args.impls:
        steps["naive"] = (run_naive(naive_loss), "") if fits > 5 else (None, "does not fit")
    if "compiled" in args.impls:
        steps["compiled"] = (run_naive(torch.compile(naive_loss)), "torch.compile of the reference") if fits > 4 \
            else (None, "does not fit")
    if "chunked" in args.impls:
        def chunked(i):
            hs = sets[i][0]
            reset(hs)
            L.fused_linear_topk_distill_loss(hs, ws, *targets[i], reduction="token_mean", impl="chunked").backward()
        steps["chunked"] = (chunked, "")
    if "triton" in args.impls:
        why = _triton_available(device)
        if why:
            steps["triton"] = (None, why)
        elif _dispatcher_has_triton():
            def triton_api(i):
                hs = sets[i][0]
                reset(hs)
                L.fused_linear_topk_distill_loss(hs, ws, *targets[i], reduction="token_mean", impl="triton").backward()
            steps["triton"] = (triton_api, "")
        else:
            from sdft.losses.triton_topk import triton_fused_linear_topk_distill
            scale = torch.full((n,), 1.0 / n, device=device)

            def triton_direct(i):
                hs = sets[i][0]
                reset(hs)
                _, dh, dw, _ = triton_fused_linear_topk_distill(hs, ws, *targets[i], token_scale=scale,
                                                                need_weight_grad=mode == "full")
                hs.grad = dh.to(hs.dtype)
                if dw is not None:
                    ws.grad = dw.to(ws.dtype)
            steps["triton"] = (triton_direct, "direct call (no dispatcher yet)")
    if "liger" in args.impls:
        steps["liger"] = (None, "no top-K loss in Liger")
    return steps


def teacher_topk_steps(sets, wt, args, device):
    import sdft.losses as L
    from sdft.losses import reference

    n, v = sets[0][1].shape[0], wt.shape[0]
    k = args.topk
    steps = {}
    if "naive" in args.impls:
        steps["naive"] = ((lambda i: reference.topk_logprobs(sets[i][1] @ wt.T, k)), "") \
            if _max_logit_buffers(n, v, device) > 3 else (None, "does not fit")
    if "chunked" in args.impls:
        steps["chunked"] = ((lambda i: L.fused_linear_topk(sets[i][1], wt, k, impl="chunked")), "")
    if "triton" in args.impls:
        why = _triton_available(device)
        if why:
            steps["triton"] = (None, why)
        else:
            from sdft.losses.triton_topk import triton_fused_linear_topk
            steps["triton"] = ((lambda i: triton_fused_linear_topk(sets[i][1], wt, k)), "")
    return steps


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------

def make_inputs(n: int, h: int, v: int, rotate: int, device, dtype):
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    ws = (torch.randn(v, h, device=device, generator=g) * h ** -0.5 * 2).to(dtype)
    wt = (ws.float() + 0.2 * torch.randn(v, h, device=device, generator=g) * h ** -0.5).to(dtype)
    sets = []
    for _ in range(rotate):
        hs = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
        ht = (hs.detach().float() + 0.5 * torch.randn(n, h, device=device, generator=g)).to(dtype)
        sets.append((hs, ht))
    return ws, wt, sets


def run_rows(case: str, loss: str, mode: str, steps: dict, n_sets: int, mm_ms: float, device, args) -> list:
    import torch
    rows = []
    for impl, (step, note) in steps.items():
        row = {"case": case, "loss": loss, "mode": mode, "impl": impl, "ms": None, "extra_gib": None,
               "floor_fraction": None, "note": note}
        if step is not None:
            try:
                row.update(measure(step, n_sets, device, args.warmup, args.iters))
                row["floor_fraction"] = GEMMS[(loss, mode)] * mm_ms / row["ms"]
            except Exception as exc:  # one failing path (OOM, missing kernel) must not stop the others
                row["note"] = "out of memory" if _is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(row) -> str:
    ms = "-" if row["ms"] is None else f"{row['ms']:.1f}"
    gib = "-" if row["extra_gib"] is None else f"{row['extra_gib']:.2f}"
    frac = "-" if row["floor_fraction"] is None else f"{100 * row['floor_fraction']:.0f}%"
    return f"| {row['case']} | {row['loss']} | {row['mode']} | {row['impl']} | {ms} | {gib} | {frac} | {row['note']} |"


def sweep(case: str, n: int, h: int, v: int, device, dtype, args) -> list:
    """Forward-KL LoRA step of the Triton path under several tile configurations."""
    from dataclasses import replace

    import torch

    from sdft.losses.triton_common import CUDA_TILES, INTERPRETER_TILES
    from sdft.losses.triton_kl import triton_fused_linear_kl
    base = CUDA_TILES if device.type == "cuda" else INTERPRETER_TILES
    if device.type == "cuda":
        variants = [dict(), dict(block_n=64), dict(block_v=64), dict(block_n=64, block_v=256), dict(num_stages=4),
                    dict(num_stages=2), dict(group=16), dict(group=4), dict(block_h=32, num_stages=4),
                    dict(mm_block_n=256, mm_num_stages=3), dict(programs=2 * 132), dict(programs=8 * 132)]
    else:
        variants = [dict(), dict(block_v=64)]
    ws, wt, sets = make_inputs(n, h, v, args.rotate, device, dtype)
    scale = torch.full((n,), 1.0 / n, device=device)
    rows = []
    for overrides in variants:
        cfg = replace(base, **overrides)

        def step(i):
            hs, ht = sets[i]
            triton_fused_linear_kl(hs, ws, ht, wt, kind=args.kind, token_scale=scale, need_weight_grad=False,
                                   tiles=cfg)
        try:
            res = measure(step, len(sets), device, args.warmup, args.iters)
            row = {"case": case, "tiles": overrides or "default", **res}
        except Exception as exc:
            row = {"case": case, "tiles": overrides or "default", "ms": None, "note": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        ms = "-" if row.get("ms") is None else f"{row['ms']:.1f}"
        print(f"| {row['tiles']} | {ms} | {row.get('note', '')} |", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or smoke-test with --device cpu --tiny", file=sys.stderr)
        return 2
    args.impls = [s for s in args.impls.split(",") if s]
    table = TINY_CASES if args.tiny else CASES
    names = list(table) if args.cases is None else [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in table]
    if unknown:
        print(f"unknown case(s) {unknown}; allowed: {', '.join(table)}", file=sys.stderr)
        return 2
    losses = [s for s in args.losses.split(",") if s]
    modes = [s for s in args.modes.split(",") if s]
    dtype = torch.bfloat16
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "kind": args.kind, "topk": args.topk}
    if importlib.util.find_spec("triton") is not None:
        import triton
        info["triton"] = triton.__version__
    print(f"# {info}")
    results = {"info": info, "matmul": {}, "rows": [], "sweep": []}
    if args.sweep:
        name = names[0]
        print("| tiles | ms (median) | note |\n|---|---|---|")
        results["sweep"] = sweep(name, *table[name], device, dtype, args)
    print("| case | loss | mode | impl | ms (median) | peak extra GiB | of matmul floor | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        n, h, v = table[name]
        ws, wt, sets = make_inputs(n, h, v, args.rotate, device, dtype)
        mm = matmul_ms(sets[0][1], wt, device, args.warmup, args.iters)
        results["matmul"][name] = {"ms": mm, "tflops": 2 * n * h * v / mm / 1e9}
        print(f"| {name} | matmul [{n},{h}]x[{h},{v}] | - | torch | {mm:.2f} | - | "
              f"{2 * n * h * v / mm / 1e9:.0f} TFLOP/s | the floor's unit |")
        for mode in modes:
            if "kl" in losses:
                results["rows"] += run_rows(name, "kl", mode, kl_steps(sets, ws, wt, args, mode, device),
                                            len(sets), mm, device, args)
        if "topk" in losses or "teacher_topk" in losses:
            from sdft.losses import fused_linear_topk
            with torch.no_grad():
                targets = [fused_linear_topk(ht, wt, args.topk, impl="chunked") for _, ht in sets]
            if "teacher_topk" in losses:
                results["rows"] += run_rows(name, "teacher_topk", "-", teacher_topk_steps(sets, wt, args, device),
                                            len(sets), mm, device, args)
            if "topk" in losses:
                for mode in modes:
                    results["rows"] += run_rows(name, "topk", mode, topk_steps(sets, ws, targets, args, mode, device),
                                                len(sets), mm, device, args)
        del ws, wt, sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"# wrote {args.json}")
    failed = [r for r in results["rows"] if r["note"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
