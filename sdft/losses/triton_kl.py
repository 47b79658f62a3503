"""Triton kernels for the full-vocabulary fused-linear divergences (forward KL, reverse KL, JSD).

Notation (per token n, vocabulary column v): a = (h_s W_s^T + b_s) / T, b = (h_t W_t^T + b_t) / T,
log p_s = a - lse_s, log p_t = b - lse_t (formed as (a - max) - log-sum, see triton_common). Per-token losses:
  forward  L = sum_v p_t (log p_t - log p_s) = E_pt[b - a] - lse_t + lse_s
  reverse  L = sum_v p_s (log p_s - log p_t) = E_ps[a - b] - lse_s + lse_t
  jsd      L = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
           log m = logaddexp(log p_s + log(1 - beta), log p_t + log beta)
           (beta = 0 is forward KL and beta = 1 reverse KL, special-cased as in the official code)
Gradients wrt the student logits z (before the division by T), times the per-token scale c_n:
  forward  dz = c (p_s - p_t) / T
  reverse  dz = c p_s (log p_s - log p_t - L) / T = c p_s ((a - b) - E_ps[a - b]) / T
  jsd      dz = c (1 - beta) p_s (log p_s - log m - KL(p_s || m)) / T

Passes (the logit tiles live in registers only; GEMM = one N x V x H product):
  1. stats   online softmax of student and teacher over vocabulary tiles, plus E_pt[b - a] (forward) or
             E_ps[a - b] (reverse); grid = row blocks x vocabulary splits, partials merged in torch.  2 GEMMs
  1b. jsd    (jsd only) KL(p_t || m) and KL(p_s || m) with the final lse.                               2 GEMMs
  2. grad    per (row block, vocabulary tile): recompute both tiles, write dz (bf16 for bf16 inputs, else
             fp32) into a [rows, V] buffer bounded by `max_dz_bytes` (token chunks), and column sums for
             the bias gradient.                                                                           2 GEMMs
  3. dh = dz W_s (fp32 accumulation, fp32 output)                                                       1 GEMM
  4. dW += dz^T h_s (fp32 accumulator, only when need_weight_grad)                                      1 GEMM
So forward/reverse cost 5 GEMMs (6 with the weight gradient), jsd 7 (8).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._reduction import zero_inactive_rows
from .triton_common import (
    NEG_C, TileConfig, check_active, check_pair, check_scale, check_temperature, clean_bias, default_tiles,
    dot_flags, grouped_tile, logit_tile, matmul_fp32, merge_softmax, vocab_splits,
)

KINDS = ("forward", "reverse", "jsd")
_KIND_CODE = {"forward": 0, "reverse": 1, "jsd": 2}


@triton.jit
def _kl_stats_kernel(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, part_ptr,
                     N, V, HS, HT, s_hs_n, s_hs_h, s_ws_v, s_ws_h, s_ht_n, s_ht_h, s_wt_v, s_wt_h,
                     temperature, n_splits, tiles_per_split,
                     KIND: tl.constexpr, HAS_SB: tl.constexpr, HAS_TB: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                     PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, WIDEN: tl.constexpr):
    """Partials [5, S, N]: (m_s, l_s, m_t, l_t, x) over one vocabulary split; x = sum e_t (b - a) with
    e_t = exp(b - m_t) for KIND 0, sum e_s (a - b) for KIND 1, unused for KIND 2."""
    row_block, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s = tl.full((BLOCK_N,), NEG_C, tl.float32)
    m_t = tl.full((BLOCK_N,), NEG_C, tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    x = tl.zeros((BLOCK_N,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        a = logit_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, N, V, HS, s_hs_n, s_hs_h, s_ws_v, s_ws_h,
                       temperature, HAS_SB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_S, WIDEN)
        b = logit_tile(ht_ptr, wt_ptr, bt_ptr, offs_n, offs_v, N, V, HT, s_ht_n, s_ht_h, s_wt_v, s_wt_h,
                       temperature, HAS_TB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_T, WIDEN)
        a = tl.where(col_ok, a, NEG_C)
        b = tl.where(col_ok, b, NEG_C)
        new_s = tl.maximum(m_s, tl.max(a, axis=1))
        new_t = tl.maximum(m_t, tl.max(b, axis=1))
        alpha_s = tl.exp(m_s - new_s)
        alpha_t = tl.exp(m_t - new_t)
        e_s = tl.where(col_ok, tl.exp(a - new_s[:, None]), 0.0)
        e_t = tl.where(col_ok, tl.exp(b - new_t[:, None]), 0.0)
        l_s = l_s * alpha_s + tl.sum(e_s, axis=1)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        if KIND == 0:
            x = x * alpha_t + tl.sum(e_t * (b - a), axis=1)
        if KIND == 1:
            x = x * alpha_s + tl.sum(e_s * (a - b), axis=1)
        m_s = new_s
        m_t = new_t
    row_ok = offs_n < N
    out = part_ptr + split * N + offs_n
    plane = n_splits * N
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + plane, l_s, mask=row_ok)
    tl.store(out + 2 * plane, m_t, mask=row_ok)
    tl.store(out + 3 * plane, l_t, mask=row_ok)
    tl.store(out + 4 * plane, x, mask=row_ok)


@triton.jit
def _log_mixture(log_ps, log_pt, log_1mb, log_b):
    """log m = logaddexp(log p_s + log(1 - beta), log p_t + log beta)."""
    u = log_ps + log_1mb
    w = log_pt + log_b
    # a NaN must reach log m (the default max / min would drop it and hide a NaN teacher from the gradient)
    hi = tl.maximum(u, w, propagate_nan=tl.PropagateNan.ALL)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(u, w, propagate_nan=tl.PropagateNan.ALL) - hi))


@triton.jit
def _jsd_loss_kernel(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, norm_ptr, part_ptr,
                     N, V, HS, HT, s_hs_n, s_hs_h, s_ws_v, s_ws_h, s_ht_n, s_ht_h, s_wt_v, s_wt_h,
                     temperature, log_1mb, log_b, n_splits, tiles_per_split,
                     HAS_SB: tl.constexpr, HAS_TB: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                     PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, WIDEN: tl.constexpr):
    """Partials [2, S, N]: KL(p_t || m) and KL(p_s || m) summed over one vocabulary split."""
    row_block, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    shift_s = tl.load(norm_ptr + offs_n, mask=row_ok, other=0.0)[:, None]
    log_sum_s = tl.load(norm_ptr + N + offs_n, mask=row_ok, other=0.0)[:, None]
    shift_t = tl.load(norm_ptr + 2 * N + offs_n, mask=row_ok, other=0.0)[:, None]
    log_sum_t = tl.load(norm_ptr + 3 * N + offs_n, mask=row_ok, other=0.0)[:, None]
    kl_t = tl.zeros((BLOCK_N,), tl.float32)
    kl_s = tl.zeros((BLOCK_N,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        a = logit_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, N, V, HS, s_hs_n, s_hs_h, s_ws_v, s_ws_h,
                       temperature, HAS_SB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_S, WIDEN)
        b = logit_tile(ht_ptr, wt_ptr, bt_ptr, offs_n, offs_v, N, V, HT, s_ht_n, s_ht_h, s_wt_v, s_wt_h,
                       temperature, HAS_TB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_T, WIDEN)
        log_ps = (a - shift_s) - log_sum_s
        log_pt = (b - shift_t) - log_sum_t
        log_m = _log_mixture(log_ps, log_pt, log_1mb, log_b)
        kl_t += tl.sum(tl.where(col_ok, tl.exp(log_pt) * (log_pt - log_m), 0.0), axis=1)
        kl_s += tl.sum(tl.where(col_ok, tl.exp(log_ps) * (log_ps - log_m), 0.0), axis=1)
    out = part_ptr + split * N + offs_n
    tl.store(out, kl_t, mask=row_ok)
    tl.store(out + n_splits * N, kl_s, mask=row_ok)


@triton.jit
def _kl_grad_kernel(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, norm_ptr, c_ptr, scale_ptr,
                    dz_ptr, db_ptr, N, row0, n_rows, V, HS, HT,
                    s_hs_n, s_hs_h, s_ws_v, s_ws_h, s_ht_n, s_ht_h, s_wt_v, s_wt_h, s_dz_n,
                    temperature, one_m_beta, log_1mb, log_b,
                    KIND: tl.constexpr, HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, BIAS_GRAD: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, WIDEN: tl.constexpr):
    """dz [n_rows, V] for rows row0 .. row0 + n_rows (see the module docstring), already times c / T;
    with BIAS_GRAD also column sums [row blocks, V] into db."""
    row_block, col_block = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    local = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    local_ok = local < n_rows
    offs_n = row0 + local
    n_end = row0 + n_rows
    offs_v = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    scale = tl.load(scale_ptr + offs_n, mask=local_ok, other=0.0)
    shift_s = tl.load(norm_ptr + offs_n, mask=local_ok, other=0.0)[:, None]
    log_sum_s = tl.load(norm_ptr + N + offs_n, mask=local_ok, other=0.0)[:, None]
    a = logit_tile(hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, n_end, V, HS, s_hs_n, s_hs_h, s_ws_v, s_ws_h,
                   temperature, HAS_SB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_S, WIDEN)
    b = logit_tile(ht_ptr, wt_ptr, bt_ptr, offs_n, offs_v, n_end, V, HT, s_ht_n, s_ht_h, s_wt_v, s_wt_h,
                   temperature, HAS_TB, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION_T, WIDEN)
    log_ps = (a - shift_s) - log_sum_s
    p_s = tl.exp(log_ps)
    if KIND != 1:
        shift_t = tl.load(norm_ptr + 2 * N + offs_n, mask=local_ok, other=0.0)[:, None]
        log_sum_t = tl.load(norm_ptr + 3 * N + offs_n, mask=local_ok, other=0.0)[:, None]
    if KIND == 0:
        g = p_s - tl.exp((b - shift_t) - log_sum_t)
    elif KIND == 1:
        mean_diff = tl.load(c_ptr + offs_n, mask=local_ok, other=0.0)
        g = p_s * ((a - b) - mean_diff[:, None])
    else:
        kl_s = tl.load(c_ptr + offs_n, mask=local_ok, other=0.0)
        log_m = _log_mixture(log_ps, (b - shift_t) - log_sum_t, log_1mb, log_b)
        g = one_m_beta * p_s * (log_ps - log_m - kl_s[:, None])
    # inactive rows arrive with zeroed inputs and scale 0: g * 0 = 0 there, while NaN in an active row stays
    keep = local_ok[:, None] & col_ok[None, :]
    g = tl.where(keep, g * (scale / temperature)[:, None], 0.0)
    tl.store(dz_ptr + local.to(tl.int64)[:, None] * s_dz_n + offs_v[None, :], g.to(dz_ptr.dtype.element_ty),
             mask=local_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        tl.store(db_ptr + row_block.to(tl.int64) * V + offs_v, tl.sum(g, axis=0), mask=col_ok)


def _dz_rows(n: int, v: int, element_bytes: int, block_n: int, max_dz_bytes: int) -> int:
    rows = max(block_n, (max_dz_bytes // max(1, v * element_bytes)) // block_n * block_n)
    return min(rows, max(n, 1))


def student_gradients(grad_kernel, launch_args: dict, hidden: torch.Tensor, weight: torch.Tensor,
                      has_bias: bool, need_weight_grad: bool, cfg: TileConfig, max_dz_bytes: int):
    """Run a dz kernel over token chunks and fold dz into (dh [N,H], dW [V,H] or None, db [V] or None), fp32.

    `grad_kernel(grid, dz, db_partial, row0, rows, **launch_args)` writes dz [rows, V] (already scaled by
    c / T) and, when db_partial is not None, its column sums per row block."""
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    dz_dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
    exact = weight.dtype == torch.float32
    grad_h = torch.empty(n, h, dtype=torch.float32, device=device)  # every row block is written once
    grad_w = torch.empty(v, h, dtype=torch.float32, device=device) if need_weight_grad else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=device) if has_bias else None
    if n == 0:
        return grad_h, None if grad_w is None else grad_w.zero_(), grad_b
    chunk = _dz_rows(n, v, torch.finfo(dz_dtype).bits // 8, cfg.block_n, max_dz_bytes)
    dz_buf = torch.empty(chunk, v, dtype=dz_dtype, device=device)
    db_buf = torch.empty(triton.cdiv(chunk, cfg.block_n), v, dtype=torch.float32, device=device) if has_bias else None
    for row0 in range(0, n, chunk):
        rows = min(chunk, n - row0)
        dz = dz_buf[:rows]
        grid = (triton.cdiv(rows, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
        grad_kernel(grid, dz, db_buf, row0, rows, **launch_args)
        matmul_fp32(dz, weight, grad_h[row0:row0 + rows], accumulate=False, cfg=cfg, exact_fp32=exact)
        if grad_w is not None:
            matmul_fp32(dz.T, hidden[row0:row0 + rows], grad_w, accumulate=row0 > 0, cfg=cfg, exact_fp32=exact)
        if grad_b is not None:
            grad_b += db_buf[:triton.cdiv(rows, cfg.block_n)].sum(dim=0)
    return grad_h, grad_w, grad_b


def triton_fused_linear_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_weight: torch.Tensor, *, kind: str = "forward", beta: float = 0.5,
                           temperature: float = 1.0, token_scale: torch.Tensor, student_bias=None,
                           teacher_bias=None, need_weight_grad: bool, active=None,
                           tiles: Optional[TileConfig] = None, max_dz_bytes: int = 1 << 30):
    """Per-token divergence and its precomputed student gradients, without [N, V] logits in memory.

    Shapes: student_hidden [N, H], student_weight [V, H], teacher_hidden [N, Ht], teacher_weight [V, Ht]
    (each pair in one dtype: bf16, fp16 or fp32), biases [V], token_scale [N] (c_n: mask x weight x
    reduction factor), active [N] bool (default: c_n != 0). Returns (loss [N] fp32, dh [N, H] fp32, dW [V, H]
    fp32 or None, db [V] fp32 or None) with the reduced loss sum_n c_n L_n and dh = d(sum_n c_n L_n)/d h_s
    (likewise dW, db; db whenever a student bias is given). Inactive rows get loss 0 and zero gradients
    whatever their inputs (their hidden states are replaced by zeros before the kernels); active rows follow
    IEEE arithmetic (NaN inputs give NaN). kind / beta / temperature as in the module docstring. `tiles`
    overrides the launch configuration; `max_dz_bytes` bounds the dz buffer.
    """
    n, hs_size, v = check_pair("student", student_hidden, student_weight, student_bias)
    nt, ht_size, vt = check_pair("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if vt != v or nt != n:
        raise ValueError(f"teacher_hidden [{nt}, {ht_size}] / teacher_weight [{vt}, {ht_size}] must match the "
                         f"student's N={n} tokens and V={v} vocabulary")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher inputs are on {teacher_hidden.device} but student inputs on {student_hidden.device}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not supported; allowed: 'forward', 'reverse', 'jsd'")
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be a number in [0, 1] (the teacher's weight in the mixture)")
    temperature = check_temperature(temperature)
    scale = check_scale(token_scale, n, student_hidden.device)
    active = check_active(active, scale)
    scale = torch.where(active, scale, torch.zeros_like(scale))
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse"
    device = student_hidden.device
    cfg = tiles or default_tiles(device)
    hs, ws = zero_inactive_rows(student_hidden.detach(), active), student_weight.detach()
    ht, wt = zero_inactive_rows(teacher_hidden.detach(), active), teacher_weight.detach()
    bs, bt = clean_bias(student_bias), clean_bias(teacher_bias)
    dummy = scale  # stands in for an absent bias pointer (never read)
    flags_s, flags_t = dot_flags(ws.dtype, device), dot_flags(wt.dtype, device)
    common = dict(
        hs_ptr=hs, ws_ptr=ws, bs_ptr=dummy if bs is None else bs, ht_ptr=ht, wt_ptr=wt,
        bt_ptr=dummy if bt is None else bt, V=v, HS=hs_size, HT=ht_size,
        s_hs_n=hs.stride(0), s_hs_h=hs.stride(1), s_ws_v=ws.stride(0), s_ws_h=ws.stride(1),
        s_ht_n=ht.stride(0), s_ht_h=ht.stride(1), s_wt_v=wt.stride(0), s_wt_h=wt.stride(1),
        temperature=temperature, HAS_SB=bs is not None, HAS_TB=bt is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=cfg.group,
        PRECISION_S=flags_s["PRECISION"], PRECISION_T=flags_t["PRECISION"], WIDEN=flags_s["WIDEN"],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    if n == 0:
        return loss, *student_gradients(None, {}, hs, ws, bs is not None, need_weight_grad, cfg, max_dz_bytes)

    # pass 1: softmax statistics (and the forward / reverse cross term)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    splits, per_split = vocab_splits(cfg, n_row_blocks, triton.cdiv(v, cfg.block_v), device)
    part = torch.empty(5, splits, n, dtype=torch.float32, device=device)
    _kl_stats_kernel[(n_row_blocks * splits,)](part_ptr=part, N=n, n_splits=splits, tiles_per_split=per_split,
                                               KIND=_KIND_CODE[kind], **common)
    shift_s, log_sum_s, w_s = merge_softmax(part[0], part[1])
    shift_t, log_sum_t, w_t = merge_softmax(part[2], part[3])
    norm = torch.stack([shift_s, log_sum_s, shift_t, log_sum_t]).contiguous()
    lse_gap = (shift_t - shift_s) + (log_sum_t - log_sum_s)  # lse_t - lse_s
    log_1mb = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    if kind == "forward":
        mean_diff = (part[4] * w_t).sum(0) / (part[3] * w_t).sum(0)  # E_pt[b - a]
        per_token = mean_diff - lse_gap
        row_const = lse_gap  # unused by the forward gradient
    elif kind == "reverse":
        mean_diff = (part[4] * w_s).sum(0) / (part[1] * w_s).sum(0)  # E_ps[a - b]
        per_token = mean_diff + lse_gap
        row_const = mean_diff
    else:
        # pass 1b: the mixture terms need the final lse of both sides
        kl_part = torch.empty(2, splits, n, dtype=torch.float32, device=device)
        _jsd_loss_kernel[(n_row_blocks * splits,)](norm_ptr=norm, part_ptr=kl_part, N=n,
                                                   log_1mb=log_1mb, log_b=log_b, n_splits=splits,
                                                   tiles_per_split=per_split, **common)
        kl_t_m, kl_s_m = kl_part[0].sum(0), kl_part[1].sum(0)
        per_token = beta * kl_t_m + (1.0 - beta) * kl_s_m
        row_const = kl_s_m
    loss = torch.where(active, per_token, torch.zeros_like(per_token))

    # passes 2-4: dz per token chunk, then dh = dz W_s and dW += dz^T h_s
    grad_args = dict(common, norm_ptr=norm, c_ptr=row_const.contiguous(), scale_ptr=scale, N=n,
                     one_m_beta=1.0 - beta, log_1mb=log_1mb, log_b=log_b, KIND=_KIND_CODE[kind],
                     BIAS_GRAD=bs is not None)

    def launch(grid, dz, db, row0, rows, **kw):
        _kl_grad_kernel[grid](dz_ptr=dz, db_ptr=dz if db is None else db, row0=row0, n_rows=rows,
                              s_dz_n=dz.stride(0), **kw)

    grad_h, grad_w, grad_b = student_gradients(launch, grad_args, hs, ws, bs is not None, need_weight_grad, cfg,
                                               max_dz_bytes)
    return loss, grad_h, grad_w, grad_b
