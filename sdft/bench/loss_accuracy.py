"""Accuracy of the fused losses at real shapes: chunked and Triton paths against float64 truth, beside naive
PyTorch that materializes the logits in the input dtype.

For each case (N tokens, hidden size H, vocabulary V; inputs in a low precision, 10% of the tokens masked):
  truth  `sdft.losses` on float64 logits, built row-chunk by row-chunk from the float64-cast inputs;
         gradients by float64 autograd (dL/dh = dL/dz W, dL/dW = sum over chunks dL/dz^T h)
  naive  logits = h @ W^T in the input dtype (rounded before the softmax, as plain PyTorch does), the
         same loss definitions (float32 math), autograd
  chunked, triton   the public fused API (impl=...)
Per path: relative error ||x - x*|| / ||x*|| of the per-token losses [N], dL/dh [N, H] and dL/dW [V, H]
(the student output layer is trainable here), the losses taken per token (reduction "none") with the
token-mean weights applied in the backward, as the local backend trains. Losses: forward KL (also at
temperature 2), reverse KL, JSD(0.5), top-K=20 distillation (renormalize + cross-entropy, tail + forward
KL) with the truth's teacher top-K, and the teacher top-K itself (log-prob error of the K values, and the
share of rows whose K ids agree). A fused path passes when none of its errors is larger than naive's
(top-K ids: agreement not lower).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

import sdft.losses as L
from sdft.bench.budget import Budget
from sdft.bench.measure import is_out_of_memory

CASES = {
    "qwen7b": (8192, 4096, 151936),
    "llama8b": (8192, 4096, 128256),
    "h2048": (8192, 2048, 151936),
}
TINY_CASES = {"tiny": (40, 24, 300)}
KL_LOSSES = (("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("jsd", 1.0))
TOPK_LOSSES = (("renormalize", "cross_entropy"), ("tail", "forward_kl"))
K = 20
TABLE_HEADER = ("| case | loss | path | loss err | dL/dh err | dL/dW err | top-K ids agree | <= naive |\n"
                "|---|---|---|---:|---:|---:|---:|---|")
FUSED_IMPLS = ("chunked", "triton")


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - truth|| / ||truth|| in float64."""
    truth = truth.double()
    return float((x.double() - truth).norm() / truth.norm().clamp(min=1e-300))


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Student/teacher hidden states [N, H] and output layers [V, H] like a model's (teacher = student +
    perturbation), in `dtype`, and a token mask [N] with about 10% masked."""
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(n, h, device=device, generator=g)
    ht = hs + 0.5 * torch.randn(n, h, device=device, generator=g)
    ws = torch.randn(v, h, device=device, generator=g) * (2.0 / h ** 0.5)
    wt = ws + 0.3 * torch.randn(v, h, device=device, generator=g) / h ** 0.5
    mask = torch.rand(n, device=device, generator=g) > 0.1
    return hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), mask


def naive_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What plain PyTorch does: ids [N, K] and log-probs [N, K] of log_softmax over the given logits (in
    float32 when they are in a lower precision)."""
    logp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


def _truth(per_token_fn, hs, ws, coef, rows: int):
    """float64 per-token losses [N], dL/dh [N,H] and dL/dW [V,H] for L = sum_n coef_n loss_n, where
    per_token_fn(student_logits_rows [R,V] float64, row slice) -> losses [R]."""
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


def _truth_topk(ht, wt, rows: int):
    """float64 top-K ids [N, K] and full-vocabulary log-probs [N, K] of the teacher logits."""
    ids, lps = [], []
    wt64 = wt.double()
    for start in range(0, ht.shape[0], rows):
        logp = torch.log_softmax(ht[start:start + rows].double() @ wt64.T, -1)
        values, index = logp.topk(K, -1)
        ids.append(index)
        lps.append(values)
    return torch.cat(ids), torch.cat(lps)


def _run_path(loss_fn, hs, ws, coef):
    """Per-token losses [N] of loss_fn(h, W) and the gradients of sum_n coef_n loss_n."""
    h = hs.detach().clone().requires_grad_()
    w = ws.detach().clone().requires_grad_()
    out = loss_fn(h, w)
    out.backward(coef.to(out.dtype))
    return out.detach(), h.grad, w.grad


def _compare(case, name, paths, hs, ws, coef, truth, device, log) -> list[dict]:
    t_loss, t_dh, t_dw = truth
    rows, naive = [], None
    for path, fn in paths.items():
        try:
            loss, dh, dw = _run_path(fn, hs, ws, coef)
        except Exception as error:  # noqa: BLE001 - out of memory is a result, anything else a failure
            row = {"case": case, "loss": name, "path": path, "note": "out of memory"}
            if not is_out_of_memory(error):
                row.update(note=f"failed: {type(error).__name__}: {str(error)[:200]}", passed=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            log(format_row(row))
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
        log(format_row(row))
    return rows


def _kl_item(kind: str, temperature: float, case, inputs, impls, chunk_rows, device, log) -> list[dict]:
    hs, ws, ht, wt, mask = inputs
    coef = mask.double() / mask.sum()
    wt64 = wt.double()
    name = kl_name(kind, temperature)
    common = dict(kind=kind, beta=0.5, temperature=temperature)

    def truth_rows(z, r):
        zt = ht[r].double() @ wt64.T
        return L.kl_divergence(z, zt, mask=mask[r], reduction="none", **common)
    truth = _truth(truth_rows, hs, ws, coef, chunk_rows)
    paths = {"naive": lambda h, w: L.kl_divergence(h @ w.T, ht @ wt.T, mask=mask, reduction="none", **common)}
    for impl in impls:
        paths[impl] = (lambda impl: lambda h, w: L.fused_linear_kl(h, w, ht, wt, mask=mask, reduction="none",
                                                                  impl=impl, **common))(impl)
    return _compare(case, name, paths, hs, ws, coef, truth, device, log)


def _topk_item(normalize: str, kind: str, case, inputs, teacher_topk, impls, chunk_rows, device, log) -> list[dict]:
    hs, ws, _, _, mask = inputs
    coef = mask.double() / mask.sum()
    ids, lps = teacher_topk
    ids_f, lps_f = ids.to(torch.long), lps.float()
    common = dict(normalize=normalize, kind=kind)
    truth = _truth(lambda z, r: L.topk_distill_loss(z, ids_f[r], lps_f[r], mask=mask[r], reduction="none",
                                                    **common), hs, ws, coef, chunk_rows)
    paths = {"naive": lambda h, w: L.topk_distill_loss(h @ w.T, ids_f, lps_f, mask=mask, reduction="none",
                                                       **common)}
    for impl in impls:
        paths[impl] = (lambda impl: lambda h, w: L.fused_linear_topk_distill_loss(
            h, w, ids_f, lps_f, mask=mask, reduction="none", impl=impl, **common))(impl)
    return _compare(case, f"top-{K} {normalize} {kind}", paths, hs, ws, coef, truth, device, log)


def _teacher_topk_item(case, inputs, teacher_topk, impls, log) -> list[dict]:
    _, _, ht, wt, _ = inputs
    ids, lps = teacher_topk
    results = {"naive": naive_topk(ht @ wt.T, K)}
    for impl in impls:
        results[impl] = L.fused_linear_topk(ht, wt, K, impl=impl)
    rows, naive = [], None
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
        log(format_row(row))
    return rows


def kl_name(kind: str, temperature: float) -> str:
    return f"{kind} KL" + (f" T={temperature:g}" if temperature != 1.0 else "")


def item_names() -> list[str]:
    """The losses checked per case, in order."""
    return ([kl_name(k, t) for k, t in KL_LOSSES] + [f"top-{K} {n} {k}" for n, k in TOPK_LOSSES]
            + [f"teacher top-{K}"])


def check_case(case: str, n: int, h: int, v: int, *, dtype: torch.dtype, device: torch.device,
               impls=FUSED_IMPLS, chunk_rows: int = 512, seed: int = 0, budget: Budget | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """Every loss of `item_names()` at one shape: rows {case, loss, path, loss_err, dh_err, dw_err,
    ids_agree?, passed? (fused paths), note?}. With a budget, a loss that does not fit is one row
    {case, loss, path: "-", note: "skipped: ..."}."""
    label = f"{case} N={n} H={h} V={v}"
    inputs = make_inputs(n, h, v, dtype, device, seed)
    rows: list[dict] = []
    teacher_topk = None

    def item(name, run):
        nonlocal rows
        if budget is not None and not budget.allows("loss"):
            row = {"case": label, "loss": name, "path": "-", "note": budget.skip_note("loss")}
            rows.append(row)
            log(format_row(row))
            return
        start = time.perf_counter()
        try:
            rows += run()
        except Exception as error:  # noqa: BLE001 - recorded as a failed row; the other losses still run
            row = {"case": label, "loss": name, "path": "-", "passed": False,
                   "note": f"failed: {type(error).__name__}: {str(error)[:200]}"}
            rows.append(row)
            log(format_row(row))
        if budget is not None:
            budget.record("loss", time.perf_counter() - start)

    for kind, temperature in KL_LOSSES:
        item(kl_name(kind, temperature),
             lambda: _kl_item(kind, temperature, label, inputs, impls, chunk_rows, device, log))
    for normalize, kind in TOPK_LOSSES:
        def run_topk(normalize=normalize, kind=kind):
            nonlocal teacher_topk
            if teacher_topk is None:
                teacher_topk = _truth_topk(inputs[2], inputs[3], chunk_rows)
            return _topk_item(normalize, kind, label, inputs, teacher_topk, impls, chunk_rows, device, log)
        item(f"top-{K} {normalize} {kind}", run_topk)

    def run_teacher():
        nonlocal teacher_topk
        if teacher_topk is None:
            teacher_topk = _truth_topk(inputs[2], inputs[3], chunk_rows)
        return _teacher_topk_item(label, inputs, teacher_topk, impls, log)
    item(f"teacher top-{K}", run_teacher)
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def failed_rows(rows: list[dict]) -> list[dict]:
    """The fused rows less accurate than naive PyTorch."""
    return [r for r in rows if r.get("passed") is False]


def summary_line(rows: list[dict], seconds: float) -> str:
    failed = failed_rows(rows)
    return (f"{len(rows)} rows in {seconds:.0f} s; "
            + (f"{len(failed)} fused rows worse than naive" if failed
               else "every fused path is at least as accurate as naive PyTorch"))


def format_row(row: dict) -> str:
    if "note" in row:
        return f"| {row['case']} | {row['loss']} | {row['path']} | {row['note']} | | | | |"
    cells = [f"{row[k]:.2e}" if row.get(k) is not None else "-" for k in ("loss_err", "dh_err", "dw_err")]
    agree = f"{100 * row['ids_agree']:.2f}%" if row.get("ids_agree") is not None else "-"
    verdict = {True: "yes", False: "**NO**"}.get(row.get("passed"), "(baseline)")
    return f"| {row['case']} | {row['loss']} | {row['path']} | " + " | ".join(cells) + f" | {agree} | {verdict} |"
