"""The distillation losses on a CPU: materialized reference vs the chunked fused-linear path, side by side.

For every (N, H, V) and each path: forward+backward time (median of `repeats`), peak extra memory (CPU:
the rise of the process's peak RSS over the inputs during one forward+backward, each case in a fresh
process; CUDA: torch.cuda.max_memory_allocated over the inputs), and the achieved matmul rate (the path's
GEMM FLOPs / its time) as a fraction of the plain GEMM rate measured in the same process on the same
shape. Forward KL needs 3 GEMMs of 2NHV FLOPs (student logits, teacher logits, dL/dh), 4 with the weight
gradient; top-K distillation 2 (student logits, dL/dh), 3 with it (the teacher top-K is an input).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from sdft.bench.workers import python_call, worker_env

FULL_GRID = [(n, h, v) for n in (1024, 4096) for h in (576, 1024, 4096) for v in (49152, 151936)]
QUICK_GRID = [(256, 576, 49152), (512, 1024, 49152)]


@dataclass(frozen=True)
class CaseSettings:
    """What every case of one benchmark run shares."""
    dtype: str = "float32"
    weight_grad: bool = False
    repeats: int = 3
    device: str = "cpu"
    topk: int = 20


def run_case(n: int, h: int, v: int, path: str, loss: str, settings: CaseSettings) -> dict:
    """One measurement in this process: a JSON-able row."""
    import torch

    from sdft.bench.measure import peak_rss_bytes, rss_bytes
    from sdft.losses import fused_linear_kl, fused_linear_topk, fused_linear_topk_distill_loss

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
    dev = torch.device(settings.device)
    weight_grad = settings.weight_grad
    hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * 0.05).to(dtype).requires_grad_(weight_grad)
    t_hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype)
    t_weight = (torch.randn(v, h, device=dev) * 0.05).to(dtype)
    gemm_count = 3 + int(weight_grad)
    if loss == "topk":
        ids, logprobs = fused_linear_topk(t_hidden, t_weight, settings.topk, impl="chunked")
        gemm_count = 2 + int(weight_grad)

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
        base = rss_bytes()
        step()
        peak_extra = max(0, peak_rss_bytes() - base)
    clear()
    times = []
    for _ in range(settings.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        clear()
    # the plain GEMM rate on the same shape, same dtype, measured now
    with torch.no_grad():
        x, w = hidden.detach(), weight.detach()

        def gemm():
            return torch.mm(x, w.T) if dtype == torch.float32 else torch.mm(x.float(), w.float().T)
        gemm()
        gemm_times = []
        for _ in range(max(2, settings.repeats)):
            sync()
            start = time.perf_counter()
            gemm()
            sync()
            gemm_times.append(time.perf_counter() - start)
    flop = 2.0 * n * h * v
    median = statistics.median(times)
    return {
        "n": n, "h": h, "v": v, "path": path, "loss": loss, "dtype": settings.dtype, "weight_grad": weight_grad,
        "time_s": median, "peak_extra_bytes": peak_extra, "gemm_rate_flops": flop / statistics.median(gemm_times),
        "achieved_rate_flops": gemm_count * flop / median, "gemm_count": gemm_count,
    }


def case_worker() -> int:
    """Entry point of the fresh process: argv[1] holds {"n", "h", "v", "path", "loss", "settings"} as JSON;
    prints the row as the last line of stdout."""
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_case(spec["n"], spec["h"], spec["v"], spec["path"], spec["loss"],
                              CaseSettings(**spec["settings"]))))
    return 0


def run_case_in_subprocess(n: int, h: int, v: int, path: str, loss: str, settings: CaseSettings) -> dict:
    """`run_case` in a fresh process (its peak RSS is its own); a failure becomes {"error": last line}."""
    spec = {"n": n, "h": h, "v": v, "path": path, "loss": loss, "settings": asdict(settings)}
    proc = subprocess.run(python_call("sdft.bench.cpu_losses", "case_worker", json.dumps(spec)),
                          capture_output=True, text=True, env=worker_env())
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"n": n, "h": h, "v": v, "path": path, "loss": loss, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_bytes_estimate(n: int, v: int) -> int:
    """Student and teacher logits, their log-softmax, probabilities and the logits gradient: ~6 [N, V] fp32."""
    return 6 * n * v * 4


def run_grid(grid, losses, paths, settings: CaseSettings, *, max_reference_gib: float = 14.0,
             log: Callable[[str], None] = print) -> list[dict]:
    """Every (loss, case, path), each in a fresh process; the reference is skipped ("too large") where its
    logits would exceed `max_reference_gib`. Progress lines go to `log`."""
    rows = []
    total, done = len(grid) * len(losses) * len(paths), 0
    for loss in losses:
        for n, h, v in grid:
            for path in paths:
                done += 1
                if path == "reference" and reference_bytes_estimate(n, v) > max_reference_gib * 2**30:
                    row = {"n": n, "h": h, "v": v, "path": path, "loss": loss, "skipped": "too large"}
                else:
                    start = time.time()
                    row = run_case_in_subprocess(n, h, v, path, loss, settings)
                    row["wall_s"] = time.time() - start
                rows.append(row)
                status = row.get("error") or row.get("skipped") or f"{row['time_s']:.2f} s"
                log(f"[{done}/{total}] {loss} N={n} H={h} V={v} {path}: {status}")
    return rows


def _fmt_mb(b):
    return f"{b / 2**20:,.0f}"


def format_table(rows: list[dict]) -> str:
    """One line per (loss, N, H, V): reference and chunked side by side."""
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
