"""Triton kernels for top-K: the teacher's top-K log-probs, and the student's top-K distillation loss.

Top-K selection (`triton_fused_linear_topk`): each logit a = z / T is packed with its id into one int64
key, (order-preserving int32 image of the float32 value) << 32 | (2^31 - 1 - id), so that comparing keys
orders by value and breaks ties by the lower id. A program keeps an unsorted set of the best KP keys of
each row (KP = next power of two >= K). Per vocabulary tile, only keys above the row's current minimum are
candidates; they are inserted largest first, each replacing the minimum (no sort, and usually no work
once the set is full). The online softmax runs alongside; the per-split sets are merged and sorted with
torch.topk on the keys. One GEMM.

Top-K distillation (`triton_fused_linear_topk_distill`), student log p = a - lse over the FULL vocabulary.
Teacher buckets: "renormalize" w_k = softmax over the valid slots of the teacher log-probs; "tail" w_k =
exp(lp_k) plus w_tail = max(0, 1 - sum_k w_k) for the student's mass outside the K ids,
log s_tail = lse_tail - lse with lse_tail the log-sum-exp of the non-top-K logits (exact, no 1 - sum).
  cross_entropy  L = -sum_k w_k log p(id_k) - w_tail log s_tail
  forward_kl     L = cross_entropy + sum_k w_k log w_k + w_tail log w_tail          (0 log 0 = 0)
  dL/dz_j = c / T (W p_j - w_{k(j)} [j = id_k] - w_tail [j not in ids] exp(a_j - lse_tail)),  W = sum w + w_tail
Invalid slots (id < 0 or id >= V) have weight 0; a row without a valid slot has loss 0 and zero gradient;
repeated ids are merged into one slot on the host (the kernels rely on distinct ids).
Passes: stats (lse, lse_tail, a(id_k) read from the same tiles; 1 GEMM), dz per (row block, vocabulary
tile) (1 GEMM), dh = dz W (1 GEMM), dW += dz^T h (1 GEMM, only when need_weight_grad).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl

from . import topk
from ._reduction import zero_inactive_rows
from .triton_common import (
    INT64_MIN_C, NEG_C, TileConfig, check_active, check_pair, check_scale, check_temperature, clean_bias,
    default_tiles, dot_flags, grouped_tile, logit_tile, merge_softmax, next_pow2, vocab_splits,
)
from .triton_kl import student_gradients

MAX_K = 1024
NORMALIZE = ("renormalize", "tail")
LOSS_KINDS = ("cross_entropy", "forward_kl")


@triton.jit
def _pack_keys(values, ids):
    """int64 keys ordered like (value descending, id ascending); -0.0 is folded into +0.0."""
    values = tl.where(values == 0.0, 0.0, values)
    bits = values.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - ids).to(tl.int64)


@triton.jit
def _insert_candidates(best, keys):
    """Merge keys [BLOCK_N, BLOCK_V] into the running best keys [BLOCK_N, KP] (unsorted, distinct).

    Candidates are the keys above the row's current minimum; they are taken in descending order and each
    replaces the minimum while it is larger. The loop runs as often as the busiest row needs (at most KP
    times, usually 0-2 once the running best is full)."""
    cand = tl.where(keys > tl.min(best, axis=1)[:, None], keys, INT64_MIN_C)
    while tl.max(cand) > INT64_MIN_C:
        top = tl.max(cand, axis=1)
        low = tl.min(best, axis=1)
        enter = top > low
        best = tl.where((best == low[:, None]) & enter[:, None], top[:, None], best)
        cand = tl.where((cand == top[:, None]) | (~enter)[:, None], INT64_MIN_C, cand)
    return best


@triton.jit
def _topk_kernel(h_ptr, w_ptr, b_ptr, stats_ptr, cand_ptr, N, V, H, s_h_n, s_h_h, s_w_v, s_w_h,
                 temperature, n_splits, tiles_per_split,
                 HAS_BIAS: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """Per split: softmax partials [2, S, N] (m, l) and the best KP keys per row [N, S, KP]."""
    row_block, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_N,), NEG_C, tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    # distinct sentinels below every real key, so that 'the minimum' is always one slot
    best = tl.full((BLOCK_N, KP), INT64_MIN_C, tl.int64) + tl.arange(0, KP)[None, :].to(tl.int64)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        a = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, s_h_n, s_h_h, s_w_v, s_w_h,
                       temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, WIDEN)
        a = tl.where(col_ok, a, NEG_C)
        new_m = tl.maximum(m, tl.max(a, axis=1))
        l = l * tl.exp(m - new_m) + tl.sum(tl.where(col_ok, tl.exp(a - new_m[:, None]), 0.0), axis=1)
        m = new_m
        best = _insert_candidates(best, tl.where(col_ok, _pack_keys(a, offs_v[None, :]), INT64_MIN_C))
    row_ok = offs_n < N
    tl.store(stats_ptr + split * N + offs_n, m, mask=row_ok)
    tl.store(stats_ptr + (n_splits + split) * N + offs_n, l, mask=row_ok)
    cand = cand_ptr + (offs_n.to(tl.int64)[:, None] * n_splits + split) * KP + tl.arange(0, KP)[None, :]
    tl.store(cand, best, mask=row_ok[:, None])


def _unpack_keys(keys: torch.Tensor):
    """Inverse of _pack_keys: (ids int64, values float32)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return 2147483647 - (keys & 0xFFFFFFFF), bits.view(torch.float32)


def _check_k(k, v: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(v, MAX_K):
        raise ValueError(f"k={k!r} must be an int in [1, min(V={v}, {MAX_K})] on the Triton path")
    return k


def _topk_tiles(cfg: TileConfig, kp: int) -> TileConfig:
    """Smaller row blocks for large K, so that the running [block_n, KP] int64 keys stay in registers."""
    limit = 32 if kp <= 256 else 16
    return replace(cfg, block_n=limit) if kp >= 128 and cfg.block_n > limit else cfg


@torch.no_grad()
def triton_fused_linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias=None,
                             temperature: float = 1.0, tiles: Optional[TileConfig] = None):
    """Top-K of softmax((h W^T + b) / T) per row: ids [N, K] int64 and log-probs [N, K] float32, sorted by
    descending log-prob (ties: lower id first), log-probs normalized over the full vocabulary.
    hidden [N, H], weight [V, H] (one dtype: bf16, fp16 or fp32), bias [V]; 1 <= k <= min(V, 1024)."""
    n, h_size, v = check_pair("hidden", hidden, weight, bias)
    k = _check_k(k, v)
    temperature = check_temperature(temperature)
    device = hidden.device
    kp = next_pow2(k)
    cfg = _topk_tiles(tiles or default_tiles(device), kp)
    if n == 0:
        return (torch.empty(0, k, dtype=torch.int64, device=device),
                torch.empty(0, k, dtype=torch.float32, device=device))
    b = clean_bias(bias)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    splits, per_split = vocab_splits(cfg, n_row_blocks, triton.cdiv(v, cfg.block_v), device)
    stats = torch.empty(2, splits, n, dtype=torch.float32, device=device)
    cand = torch.empty(n, splits, kp, dtype=torch.int64, device=device)
    flags = dot_flags(weight.dtype, device)
    _topk_kernel[(n_row_blocks * splits,)](
        hidden, weight, stats if b is None else b, stats, cand, n, v, h_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), temperature, splits, per_split,
        HAS_BIAS=b is not None, KP=kp, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        GROUP=cfg.group, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    shift, log_sum, _ = merge_softmax(stats[0], stats[1])
    keys = torch.topk(cand.view(n, splits * kp), k, dim=1, sorted=True).values
    ids, values = _unpack_keys(keys)
    return ids, (values - shift[:, None]) - log_sum[:, None]


@triton.jit
def _distill_stats_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, stats_ptr, picked_ptr, N, V, H, K,
                          s_h_n, s_h_h, s_w_v, s_w_h, temperature, n_splits, tiles_per_split,
                          TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                          PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """Per split: partials [4, S, N] (m, l, m_tail, l_tail) and a(id_k) into picked [N, K] for the ids
    [N, K] (int32, -1 = invalid) found in this split; tail statistics skip the rows' ids."""
    row_block, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    id_rows = ids_ptr + offs_n.to(tl.int64) * K
    m = tl.full((BLOCK_N,), NEG_C, tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    m_tail = tl.full((BLOCK_N,), NEG_C, tl.float32)
    l_tail = tl.zeros((BLOCK_N,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        v0 = tile * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        a = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, s_h_n, s_h_h, s_w_v, s_w_h,
                       temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, WIDEN)
        a = tl.where(col_ok, a, NEG_C)
        new_m = tl.maximum(m, tl.max(a, axis=1))
        l = l * tl.exp(m - new_m) + tl.sum(tl.where(col_ok, tl.exp(a - new_m[:, None]), 0.0), axis=1)
        m = new_m
        for k in range(0, K):
            id_k = tl.load(id_rows + k, mask=row_ok, other=-1)
            in_tile = (id_k >= v0) & (id_k < v0 + BLOCK_V)
            if tl.max(in_tile.to(tl.int32)) > 0:
                hit = offs_v[None, :] == id_k[:, None]
                tl.store(picked_ptr + offs_n.to(tl.int64) * K + k, tl.sum(tl.where(hit, a, 0.0), axis=1),
                         mask=in_tile & row_ok)
                if TAIL:
                    a = tl.where(hit, NEG_C, a)  # the ids are distinct: each column is picked once
        if TAIL:
            new_mt = tl.maximum(m_tail, tl.max(a, axis=1))
            l_tail = l_tail * tl.exp(m_tail - new_mt) + tl.sum(tl.where(a > NEG_C, tl.exp(a - new_mt[:, None]), 0.0),
                                                               axis=1)
            m_tail = new_mt
    out = stats_ptr + split * N + offs_n
    plane = n_splits * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, l, mask=row_ok)
    tl.store(out + 2 * plane, m_tail, mask=row_ok)
    tl.store(out + 3 * plane, l_tail, mask=row_ok)


@triton.jit
def _distill_grad_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, slot_w_ptr, norm_ptr, total_ptr, tail_w_ptr,
                         scale_ptr, dz_ptr, db_ptr, N, row0, n_rows, V, H, K, s_h_n, s_h_h, s_w_v, s_w_h, s_dz_n,
                         temperature,
                         TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                         PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """dz [n_rows, V] = c / T (W p - w_k [j = id_k] - w_tail [j not in ids] exp(a - lse_tail)) for rows
    row0 .. row0 + n_rows; with BIAS_GRAD also column sums per row block into db."""
    row_block, col_block = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    local = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    local_ok = local < n_rows
    offs_n = row0 + local
    v0 = col_block * BLOCK_V
    offs_v = v0 + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    a = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, row0 + n_rows, V, H, s_h_n, s_h_h, s_w_v, s_w_h,
                   temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, WIDEN)
    shift = tl.load(norm_ptr + offs_n, mask=local_ok, other=0.0)[:, None]
    log_sum = tl.load(norm_ptr + N + offs_n, mask=local_ok, other=0.0)[:, None]
    total = tl.load(total_ptr + offs_n, mask=local_ok, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=local_ok, other=0.0)
    g = total[:, None] * tl.exp((a - shift) - log_sum)
    id_rows = ids_ptr + offs_n.to(tl.int64) * K
    for k in range(0, K):
        id_k = tl.load(id_rows + k, mask=local_ok, other=-1)
        in_tile = (id_k >= v0) & (id_k < v0 + BLOCK_V)
        if tl.max(in_tile.to(tl.int32)) > 0:
            w_k = tl.load(slot_w_ptr + offs_n.to(tl.int64) * K + k, mask=local_ok & in_tile, other=0.0)
            hit = offs_v[None, :] == id_k[:, None]
            g = g - tl.where(hit, w_k[:, None], 0.0)
            if TAIL:
                a = tl.where(hit, NEG_C, a)  # the ids are distinct; what stays above NEG is the tail
    if TAIL:
        shift_tail = tl.load(norm_ptr + 2 * N + offs_n, mask=local_ok, other=0.0)[:, None]
        log_sum_tail = tl.load(norm_ptr + 3 * N + offs_n, mask=local_ok, other=0.0)[:, None]
        tail_w = tl.load(tail_w_ptr + offs_n, mask=local_ok, other=0.0)[:, None]
        rest = (a > NEG_C) & (tail_w != 0.0) & (log_sum_tail > NEG_C)
        g = g - tl.where(rest, tail_w * tl.exp((a - shift_tail) - log_sum_tail), 0.0)
    # inactive rows arrive with zeroed inputs and scale 0: g * 0 = 0 there, while NaN in an active row stays
    keep = local_ok[:, None] & col_ok[None, :]
    g = tl.where(keep, g * (scale / temperature)[:, None], 0.0)
    tl.store(dz_ptr + local.to(tl.int64)[:, None] * s_dz_n + offs_v[None, :], g.to(dz_ptr.dtype.element_ty),
             mask=local_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        tl.store(db_ptr + row_block.to(tl.int64) * V + offs_v, tl.sum(g, axis=0), mask=col_ok)


def _merge_repeated_ids(ids: torch.Tensor, weights: torch.Tensor):
    """ids [N, K] int64 (-1 = invalid) and slot weights [N, K] -> (distinct ids as int32, -1 elsewhere;
    summed weights). Cross-entropy terms and gradients are linear in the slot weights, so merging is exact."""
    ordered, perm = ids.sort(dim=1)
    w = weights.gather(1, perm)
    start = torch.ones_like(ordered, dtype=torch.bool)
    start[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = start.long().cumsum(dim=1) - 1
    totals = torch.zeros_like(w).scatter_add_(1, run, w).gather(1, run)
    keep = start & (ordered >= 0)
    return (torch.where(keep, ordered, torch.full_like(ordered, -1)).to(torch.int32).contiguous(),
            torch.where(keep, totals, torch.zeros_like(totals)).contiguous())


def triton_fused_linear_topk_distill(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                     topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                                     normalize: str = "renormalize", kind: str = "cross_entropy",
                                     temperature: float = 1.0, token_scale: torch.Tensor, student_bias=None,
                                     need_weight_grad: bool, active=None, tiles: Optional[TileConfig] = None,
                                     max_dz_bytes: int = 1 << 30):
    """Per-token top-K distillation loss and its precomputed student gradients (module docstring).

    student_hidden [N, H], student_weight [V, H] (one dtype: bf16, fp16 or fp32), topk_ids [N, K] integer,
    topk_logprobs [N, K] teacher log-probs, token_scale [N] (c_n), student_bias [V], active [N] bool (default:
    c_n != 0). Returns (loss [N] fp32, dh [N, H] fp32, dW [V, H] fp32 or None, db [V] fp32 or None), gradients
    of sum_n c_n L_n; inactive rows and rows without a valid id get loss 0 and zero gradients whatever their
    inputs (their hidden states and log-probs are replaced by zeros before the kernels); other rows follow
    IEEE arithmetic (NaN inputs give NaN). The teacher weights are those of `sdft.losses.topk`. Repeated ids
    in a row are merged into one slot (weights added) before the kernels, which gives the reference's values
    for repeated ids too.
    """
    n, h_size, v = check_pair("student", student_hidden, student_weight, student_bias)
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.shape[0] != n \
            or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor of shape [{n}, K], got "
                         f"{getattr(topk_ids, 'dtype', type(topk_ids).__name__)} {getattr(topk_ids, 'shape', '')}")
    if not isinstance(topk_logprobs, torch.Tensor) or topk_logprobs.shape != topk_ids.shape \
            or not topk_logprobs.dtype.is_floating_point:
        raise ValueError(f"topk_logprobs must be a float tensor of shape {tuple(topk_ids.shape)} like topk_ids, got "
                         f"{getattr(topk_logprobs, 'dtype', type(topk_logprobs).__name__)} "
                         f"{getattr(topk_logprobs, 'shape', '')}")
    for name, t in (("topk_ids", topk_ids), ("topk_logprobs", topk_logprobs)):
        if t.device != student_hidden.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {student_hidden.device}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not supported; allowed: 'renormalize', 'tail'")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; allowed: 'cross_entropy', 'forward_kl'")
    temperature = check_temperature(temperature)
    scale = check_scale(token_scale, n, student_hidden.device)
    device = student_hidden.device
    cfg = tiles or default_tiles(device)
    k = topk_ids.shape[1]
    tail = normalize == "tail"
    active = topk.active_rows(topk_ids, v, check_active(active, scale))
    row_scale = torch.where(active, scale, torch.zeros_like(scale))
    hs, ws, bs = zero_inactive_rows(student_hidden.detach(), active), student_weight.detach(), clean_bias(student_bias)
    lp = zero_inactive_rows(topk_logprobs.detach(), active)
    valid, slot_w, tail_w = topk.topk_teacher_weights(topk_ids, lp, v, normalize)
    slot_w, tail_w = slot_w.to(torch.float32), tail_w.to(torch.float32)
    self_term = topk.xlogx(slot_w).sum(dim=1) + topk.xlogx(tail_w)  # sum_b w_b log w_b
    ids32, slot_w = _merge_repeated_ids(torch.where(valid, topk_ids.long(), torch.full_like(topk_ids.long(), -1)),
                                        slot_w)
    if n == 0 or k == 0:
        return (torch.zeros(n, dtype=torch.float32, device=device),
                torch.zeros(n, h_size, dtype=torch.float32, device=device),
                torch.zeros(v, h_size, dtype=torch.float32, device=device) if need_weight_grad else None,
                torch.zeros(v, dtype=torch.float32, device=device) if bs is not None else None)

    flags = dot_flags(ws.dtype, device)
    common = dict(h_ptr=hs, w_ptr=ws, b_ptr=scale if bs is None else bs, ids_ptr=ids32, V=v, H=h_size, K=k,
                  s_h_n=hs.stride(0), s_h_h=hs.stride(1), s_w_v=ws.stride(0), s_w_h=ws.stride(1),
                  temperature=temperature, TAIL=tail, HAS_BIAS=bs is not None, BLOCK_N=cfg.block_n,
                  BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=cfg.group, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, **flags)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    splits, per_split = vocab_splits(cfg, n_row_blocks, triton.cdiv(v, cfg.block_v), device)
    stats = torch.empty(4, splits, n, dtype=torch.float32, device=device)
    picked = torch.zeros(n, k, dtype=torch.float32, device=device)
    _distill_stats_kernel[(n_row_blocks * splits,)](stats_ptr=stats, picked_ptr=picked, N=n, n_splits=splits,
                                                    tiles_per_split=per_split, **common)
    shift, log_sum, _ = merge_softmax(stats[0], stats[1])
    student_lp = (picked - shift[:, None]) - log_sum[:, None]
    loss = -(slot_w * student_lp).sum(dim=1)  # merged-away and invalid slots have weight 0, picked 0
    if kind == "forward_kl":
        loss = loss + self_term
    if tail:
        shift_tail, log_sum_tail, _ = merge_softmax(stats[2], stats[3])
        has_tail = tail_w != 0  # a NaN tail weight propagates
        tail_lp = torch.where(has_tail, (shift_tail - shift) + (log_sum_tail - log_sum), torch.zeros_like(shift))
        loss = loss - tail_w * tail_lp
    else:
        shift_tail, log_sum_tail = shift, log_sum
    loss = torch.where(active, loss, torch.zeros_like(loss))

    norm = torch.stack([shift, log_sum, shift_tail, log_sum_tail]).contiguous()
    grad_args = dict(common, slot_w_ptr=slot_w.contiguous(), norm_ptr=norm, N=n,
                     total_ptr=(slot_w.sum(dim=1) + tail_w).contiguous(),
                     tail_w_ptr=tail_w.contiguous(), scale_ptr=row_scale, BIAS_GRAD=bs is not None)

    def launch(grid, dz, db, row0, rows, **kw):
        _distill_grad_kernel[grid](dz_ptr=dz, db_ptr=dz if db is None else db, row0=row0, n_rows=rows,
                                   s_dz_n=dz.stride(0), **kw)

    dh, dw, db = student_gradients(launch, grad_args, hs, ws, bs is not None, need_weight_grad, cfg, max_dz_bytes)
    return loss, dh, dw, db
