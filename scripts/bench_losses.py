#!/usr/bin/env python
"""Benchmark the distillation losses: materialized reference vs chunked fused-linear path, side by side.

For every (N, H, V) of the grid and each path: forward+backward time (median of --repeats), peak extra
memory (CPU: the rise of the process's peak RSS over the inputs during one forward+backward, each case in
a fresh subprocess; CUDA: torch.cuda.max_memory_allocated over the inputs), and the achieved matmul rate
(the path's GEMM FLOPs / its time) as a fraction of the plain GEMM rate measured in the same run on the
same shape. Forward KL needs 3 GEMMs of 2NHV FLOPs (student logits, teacher logits, dL/dh), 4 with the
weight gradient.

  python scripts/bench_losses.py                       # the full CPU grid (tens of minutes)
  python scripts/bench_losses.py --quick               # a small grid (a minute)
  python scripts/bench_losses.py --grid 1024x1024x151936 --loss kl,topk
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

FULL_GRID = [(n, h, v) for n in (1024, 4096) for h in (576, 1024, 4096) for v in (49152, 151936)]
QUICK_GRID = [(256, 576, 49152), (512, 1024, 49152)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(n: int, h: int, v: int, path: str, loss: str, dtype_name: str, weight_grad: bool, repeats: int,
             device: str, topk: int) -> dict:
    """One measurement in this process: returns a JSON-able dict."""
    import torch

    from sdft.losses import fused_linear_kl, fused_linear_topk, fused_linear_topk_distill_loss

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    dev = torch.device(device)
    hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * 0.05).to(dtype).requires_grad_(weight_grad)
    t_hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype)
    t_weight = (torch.randn(v, h, device=dev) * 0.05).to(dtype)
    gemm_count = 3 + int(weight_grad)
    if loss == "topk":
        ids, logprobs = fused_linear_topk(t_hidden, t_weight, topk, impl="chunked")
        gemm_count = 2 + int(weight_grad)  # student logits, dL/dh (+ dL/dW); the teacher top-K is an input

        def step():
            out = fused_linear_topk_distill_loss(hidden, weight, ids, logprobs, reduction="token_mean", impl=path)
            out.backward()
    else:
        def step():
            out = fused_linear_kl(hidden, weight, t_hidden, t_weight, kind="forward", reduction="token_mean", impl=path)
            out.backward()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def clear():
        hidden.grad = None
        weight.grad = None

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        step()
        peak_extra = max(0, _peak_rss_bytes() - base)
    clear()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        clear()
    # the plain GEMM rate on the same shape, same dtype, measured now
    with torch.no_grad():
        x, w = hidden.detach(), weight.detach()
        torch.mm(x, w.T) if dtype == torch.float32 else torch.mm(x.float(), w.float().T)
        gemm_times = []
        for _ in range(max(2, repeats)):
            sync()
            start = time.perf_counter()
            torch.mm(x, w.T) if dtype == torch.float32 else torch.mm(x.float(), w.float().T)
            sync()
            gemm_times.append(time.perf_counter() - start)
    flop = 2.0 * n * h * v
    median = statistics.median(times)
    gemm_rate = flop / statistics.median(gemm_times)
    return {
        "n": n, "h": h, "v": v, "path": path, "loss": loss, "dtype": dtype_name, "weight_grad": weight_grad,
        "time_s": median, "peak_extra_bytes": peak_extra, "gemm_rate_flops": gemm_rate,
        "achieved_rate_flops": gemm_count * flop / median, "gemm_count": gemm_count,
    }


def _subprocess_case(args, n, h, v, path, loss) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{n}x{h}x{v}", "--path", path, "--loss-case", loss,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--device", args.device, "--topk", str(args.topk)]
    if args.weight_grad:
        cmd.append("--weight-grad")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"n": n, "h": h, "v": v, "path": path, "loss": loss, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_bytes_estimate(n, v) -> int:
    # student and teacher logits, their log-softmax, probabilities and the logits gradient: ~6 [N, V] fp32
    return 6 * n * v * 4


def _fmt_mb(b):
    return f"{b / 2**20:,.0f}"


def _table(rows: list[dict]) -> str:
    lines = [
        "| loss | N | H | V | reference time (s) | chunked time (s) | speed-up | reference peak extra (MiB) | "
        "chunked peak extra (MiB) | memory ratio | chunked matmul rate / GEMM rate | GEMM rate (GFLOP/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["loss"], r["n"], r["h"], r["v"]), {})[r["path"]] = r
    for (loss, n, h, v), paths in keyed.items():
        ref, chk = paths.get("reference"), paths.get("chunked")

        def cell(r, key, fmt):
            if r is None:
                return "-"
            if "error" in r or "skipped" in r:
                return r.get("skipped") or "failed"
            return fmt(r[key])
        speed = mem = "-"
        if ref and chk and "time_s" in ref and "time_s" in chk:
            speed = f"{ref['time_s'] / chk['time_s']:.2f}x"
            mem = f"{chk['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.1%}"
        frac = cell(chk, "achieved_rate_flops", lambda x: f"{x / chk['gemm_rate_flops']:.0%}")
        rate = cell(chk, "gemm_rate_flops", lambda x: f"{x / 1e9:.0f}")
        lines.append(
            f"| {loss} | {n} | {h} | {v} | {cell(ref, 'time_s', lambda x: f'{x:.2f}')} | "
            f"{cell(chk, 'time_s', lambda x: f'{x:.2f}')} | {speed} | {cell(ref, 'peak_extra_bytes', _fmt_mb)} | "
            f"{cell(chk, 'peak_extra_bytes', _fmt_mb)} | {mem} | {frac} | {rate} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid, one repeat")
    parser.add_argument("--grid", default=None, help="comma-separated NxHxV cases (default: the full grid)")
    parser.add_argument("--loss", default="kl", help="comma-separated: kl (forward KL), topk (top-K distillation)")
    parser.add_argument("--paths", default="reference,chunked")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--weight-grad", action="store_true", help="also compute the output-layer weight gradient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-reference-gib", type=float, default=14.0,
                        help="skip the reference path where its logits would exceed this (it would not fit)")
    parser.add_argument("--json", default=None, help="write the raw rows to this JSON file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        n, h, v = map(int, args.case.split("x"))
        print(json.dumps(run_case(n, h, v, args.path, args.loss_case, args.dtype, args.weight_grad, args.repeats,
                                  args.device, args.topk)))
        return 0

    if args.quick:
        grid, args.repeats = QUICK_GRID, 1
    elif args.grid:
        grid = [tuple(map(int, c.split("x"))) for c in args.grid.split(",")]
    else:
        grid = FULL_GRID
    import torch
    print(f"# sdft loss benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}, dtype {args.dtype}, "
          f"weight grad {args.weight_grad}", flush=True)
    rows = []
    losses = args.loss.split(",")
    total = len(grid) * len(losses) * len(args.paths.split(","))
    done = 0
    for loss in losses:
        for n, h, v in grid:
            for path in args.paths.split(","):
                done += 1
                if path == "reference" and _reference_bytes_estimate(n, v) > args.max_reference_gib * 2**30:
                    row = {"n": n, "h": h, "v": v, "path": path, "loss": loss, "skipped": "too large"}
                else:
                    start = time.time()
                    row = _subprocess_case(args, n, h, v, path, loss)
                    row["wall_s"] = time.time() - start
                rows.append(row)
                status = row.get("error") or row.get("skipped") or f"{row['time_s']:.2f} s"
                print(f"[{done}/{total}] {loss} N={n} H={h} V={v} {path}: {status}", file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
