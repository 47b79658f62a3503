#!/usr/bin/env python
"""Accuracy of the fused losses at real shapes: chunked and Triton paths against float64 truth, beside naive
PyTorch that materializes the logits in the input dtype.

For each case (N tokens, hidden size H, vocabulary V; inputs in --dtype, 10% of the tokens masked):
  truth  sdft.losses.reference on float64 logits, built row-chunk by row-chunk from the float64-cast
         inputs; gradients by float64 autograd (dL/dh = dL/dz W, dL/dW = sum over chunks dL/dz^T h)
  naive  logits = h @ W^T in the input dtype (rounded before the softmax, as plain PyTorch does), the
         same reference formulas (float32 math), autograd
  chunked, triton   the public fused API (impl=...)
Per path: relative error ||x - x*|| / ||x*|| of the per-token losses, dL/dh and dL/dW (the student output
layer is trainable here), the losses taken per token (reduction "none") with the token-mean weights
applied in the backward, as the local backend trains. Losses: forward KL (also at temperature 2), reverse
KL, JSD(0.5), top-K=20 distillation (renormalize + cross-entropy, tail + forward KL) with the truth's
teacher top-K, and the teacher top-K itself (log-prob error of the K values, and the share of ids agreeing).
A fused path passes when none of its errors is larger than naive's (top-K ids: agreement not lower).

  python scripts/check_losses_gpu.py --device cuda                      # N=8192, H=4096, V=151936, bf16
  python scripts/check_losses_gpu.py --device cuda --cases h2048,llama8b --json out.json
  TRITON_INTERPRET=1 python scripts/check_losses_gpu.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "qwen7b": (8192, 4096, 151936),
    "llama8b": (8192, 4096, 128256),
    "h2048": (8192, 2048, 151936),
}
TINY_CASES = {"tiny": (40, 24, 300)}
KL_LOSSES = (("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("jsd", 1.0))
TOPK_LOSSES = (("renormalize", "cross_entropy"), ("tail", "forward_kl"))
K = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test; Triton needs "
                                                       "TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--cases", default="qwen7b", help=f"comma list from {', '.join(CASES)}")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--impls", default="chunked,triton", help="fused paths to check: chunked, triton")
    p.add_argument("--rows", type=int, default=512, help="rows per float64 truth chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the real shapes are GPU-sized)")
    args.cases = list(TINY_CASES) if args.tiny else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES) - set(TINY_CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; allowed: {', '.join(CASES)}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not set(args.impls) <= {"chunked", "triton"}:
        p.error(f"--impls must name chunked and/or triton, got {args.impls}")
    return args


def rel_err(x, truth) -> float:
    truth = truth.double()
    return float((x.double() - truth).norm() / truth.norm().clamp(min=1e-300))


def make_inputs(n: int, h: int, v: int, dtype, device, seed: int):
    """Student/teacher hidden states and output layers like a model's: teacher = student + perturbation."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(n, h, device=device, generator=g)
    ht = hs + 0.5 * torch.randn(n, h, device=device, generator=g)
    ws = torch.randn(v, h, device=device, generator=g) * (2.0 / h ** 0.5)
    wt = ws + 0.3 * torch.randn(v, h, device=device, generator=g) / h ** 0.5
    mask = torch.rand(n, device=device, generator=g) > 0.1
    return hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), mask


def _truth(per_token_fn, hs, ws, coef, rows: int):
    """float64 per-token losses [N], dL/dh [N,H] and dL/dW [V,H] for L = sum_n coef_n loss_n, where
    per_token_fn(student_logits_rows [R,V] float64, row slice) -> losses [R]."""
    import torch

    hs64, ws64 = hs.double(), ws.double()
    losses = torch.zeros(hs.shape[0], dtype=torch.float64, device=hs.device)
    dh = torch.zeros_like(hs64)
    dw = torch.zeros_like(ws64)
    for start in range(0, hs.shape[0], rows):
        r = slice(start, start + rows)
        z = (hs64[r] @ ws64.T).requires_grad_()
        out = per_token_fn(z, r)
        (gz,) = torch.autograd.grad((out * coef[r].double()).sum(), z)
        losses[r] = out.detach()
        dh[r] = gz @ ws64
        dw += gz.T @ hs64[r]
        del z, out, gz
    return losses, dh, dw


def _run_path(loss_fn, hs, ws, coef):
    """Per-token losses [N] of loss_fn(h, W) and the gradients of sum_n coef_n loss_n."""
    h = hs.detach().clone().requires_grad_()
    w = ws.detach().clone().requires_grad_()
    out = loss_fn(h, w)
    out.backward(coef.to(out.dtype))
    return out.detach(), h.grad, w.grad


def check_kl(case, inputs, args, device) -> list[dict]:
    import sdft.losses as L
    from sdft.losses import reference

    hs, ws, ht, wt, mask = inputs
    coef = mask.double() / mask.sum()
    wt64 = wt.double()
    rows = []
    for kind, temperature in KL_LOSSES:
        name = f"{kind} KL" + (f" T={temperature:g}" if temperature != 1.0 else "")
        common = dict(kind=kind, beta=0.5, temperature=temperature)

        def truth_rows(z, r):
            zt = ht[r].double() @ wt64.T
            return reference.kl_divergence(z, zt, mask=mask[r], reduction="none", **common)
        truth = _truth(truth_rows, hs, ws, coef, args.rows)
        paths = {"naive": lambda h, w: reference.kl_divergence(h @ w.T, ht @ wt.T, mask=mask, reduction="none",
                                                                 **common)}
        for impl in args.impls:
            paths[impl] = (lambda impl: lambda h, w: L.fused_linear_kl(h, w, ht, wt, mask=mask, reduction="none",
                                                                      impl=impl, **common))(impl)
        rows += _compare(case, name, paths, hs, ws, coef, truth, device)
    return rows


def check_topk(case, inputs, args, device) -> list[dict]:
    import torch

    import sdft.losses as L
    from sdft.losses import reference

    hs, ws, ht, wt, mask = inputs
    coef = mask.double() / mask.sum()
    ids, lps = _truth_topk(ht, wt, args.rows)
    ids_f, lps_f = ids.to(torch.long), lps.float()
    rows = []
    for normalize, kind in TOPK_LOSSES:
        name = f"top-{K} {normalize} {kind}"
        common = dict(normalize=normalize, kind=kind)
        truth = _truth(lambda z, r: reference.topk_distill_loss(z, ids_f[r], lps_f[r], mask=mask[r], reduction="none",
                                                                **common), hs, ws, coef, args.rows)
        paths = {"naive": lambda h, w: reference.topk_distill_loss(h @ w.T, ids_f, lps_f, mask=mask,
                                                                     reduction="none", **common)}
        for impl in args.impls:
            paths[impl] = (lambda impl: lambda h, w: L.fused_linear_topk_distill_loss(
                h, w, ids_f, lps_f, mask=mask, reduction="none", impl=impl, **common))(impl)
        rows += _compare(case, name, paths, hs, ws, coef, truth, device)
    # the teacher's top-K from hidden states
    results = {"naive": reference.topk_logprobs((ht @ wt.T), K)}
    for impl in args.impls:
        results[impl] = L.fused_linear_topk(ht, wt, K, impl=impl)
    naive = None
    for path, (got_ids, got_lps) in results.items():
        err = rel_err(got_lps.float().sort(-1, descending=True).values, lps)
        agree = float((got_ids.long().sort(-1).values == ids.long().sort(-1).values).all(-1).double().mean())
        row = {"case": case, "loss": f"teacher top-{K}", "path": path, "loss_err": err, "dh_err": None,
               "dw_err": None, "ids_agree": agree}
        if path == "naive":
            naive = row
        else:
            row["passed"] = err <= naive["loss_err"] and agree >= naive["ids_agree"]
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _truth_topk(ht, wt, rows: int):
    """float64 top-K ids [N, K] and full-vocabulary log-probs [N, K] of the teacher logits."""
    import torch

    ids, lps = [], []
    wt64 = wt.double()
    for start in range(0, ht.shape[0], rows):
        logp = torch.log_softmax(ht[start:start + rows].double() @ wt64.T, -1)
        values, index = logp.topk(K, -1)
        ids.append(index)
        lps.append(values)
    return torch.cat(ids), torch.cat(lps)


def _compare(case, name, paths, hs, ws, coef, truth, device) -> list[dict]:
    import torch

    t_loss, t_dh, t_dw = truth
    rows, naive = [], None
    for path, fn in paths.items():
        try:
            loss, dh, dw = _run_path(fn, hs, ws, coef)
        except torch.cuda.OutOfMemoryError:
            row = {"case": case, "loss": name, "path": path, "note": "out of memory"}
            rows.append(row)
            print(_format(row), flush=True)
            continue
        row = {"case": case, "loss": name, "path": path, "loss_err": rel_err(loss, t_loss),
               "dh_err": rel_err(dh, t_dh), "dw_err": rel_err(dw, t_dw)}
        del loss, dh, dw
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if path == "naive":
            naive = row
        elif naive is not None and "loss_err" in naive:
            row["passed"] = all(row[k] <= naive[k] for k in ("loss_err", "dh_err", "dw_err"))
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(row) -> str:
    if "note" in row:
        return f"| {row['case']} | {row['loss']} | {row['path']} | {row['note']} | | | | |"
    cells = [f"{row[k]:.2e}" if row.get(k) is not None else "-" for k in ("loss_err", "dh_err", "dw_err")]
    agree = f"{100 * row['ids_agree']:.2f}%" if row.get("ids_agree") is not None else "-"
    verdict = {True: "yes", False: "**NO**"}.get(row.get("passed"), "(baseline)")
    return f"| {row['case']} | {row['loss']} | {row['path']} | " + " | ".join(cells) + f" | {agree} | {verdict} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if "triton" in args.impls and (importlib.util.find_spec("triton") is None or
                                   (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")):
        print("note: the Triton path is left out (triton not installed, or CPU without TRITON_INTERPRET=1)")
        args.impls = [i for i in args.impls if i != "triton"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"check_losses_gpu: {what}, torch {torch.__version__}, inputs {args.dtype}, paths naive + "
          f"{', '.join(args.impls)}; relative errors against float64 truth", flush=True)
    print("| case | loss | path | loss err | dL/dh err | dL/dW err | top-K ids agree | <= naive |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    rows, start = [], time.perf_counter()
    for case in args.cases:
        n, h, v = (TINY_CASES if args.tiny else CASES)[case]
        inputs = make_inputs(n, h, v, dtype, device, args.seed)
        rows += check_kl(f"{case} N={n} H={h} V={v}", inputs, args, device)
        rows += check_topk(f"{case} N={n} H={h} V={v}", inputs, args, device)
        del inputs
    failed = [r for r in rows if r.get("passed") is False]
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s; "
          + (f"{len(failed)} fused rows worse than naive" if failed else "every fused path is at least as accurate "
             "as naive PyTorch"))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": what, "dtype": args.dtype, "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
