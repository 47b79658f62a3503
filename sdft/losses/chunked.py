"""Chunked fused-linear losses: logits are built one token chunk at a time, never [N, V] at once.

For a chunk of rows the student logits z = (h W^T + b) / T are formed in float32 (float64 for float64
inputs), a per-chunk kernel returns the per-token loss L [n] and dL/dz [n, V], and the gradients are
folded in at once: dL/dh = (c / T) dL/dz W, dL/dW += ((c / T) dL/dz)^T h, dL/db += sum_n (c_n / T) dL/dz_n,
where c [N] are the reduction coefficients (loss = sum_n c_n L_n, see `_reduction.token_scale`).
Inactive rows (masked, `ChunkPlan.active`) are skipped entirely: exactly zero loss and gradient whatever
their inputs. Active rows follow IEEE arithmetic, so a NaN there (or a NaN coefficient) gives a NaN loss
and NaN gradients, also when c_n = 0.

Peak extra memory: a few [chunk, V] float32 buffers, the [N, H] hidden-state gradient, and, when the
weight requires grad, a float32 [V, H] accumulator. bf16/fp16 weights are upcast to float32 once
(a [V, H] copy) so that logits are never rounded to low precision before the softmax.

With a reduced loss (a scalar), all gradients are computed during the forward pass and the backward
only multiplies by grad_output. For per-token output (reduction "none") the hidden-state gradient is
still precomputed per row; a weight gradient then needs one more pass that recomputes the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

CHUNK_BUDGET_BYTES = 64 * 2**20
"""Target size of one [chunk, V] float32 buffer when chunk_size is None."""


def auto_chunk_size(vocab_size: int, element_bytes: int = 4) -> int:
    """Rows per chunk so that one [rows, V] buffer takes about CHUNK_BUDGET_BYTES (a multiple of 8, >= 8)."""
    rows = CHUNK_BUDGET_BYTES // max(1, vocab_size * element_bytes)
    return max(8, (rows // 8) * 8)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[n, v] b[n, v] for [n, V] inputs without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


# ----------------------------------------------------------------------------------------------------
# Per-chunk kernels: (student logits z [n, V] already divided by T, row indices [n]) -> (L [n], dL/dz [n, V],
# extra [n] or None). They may overwrite z.
# ----------------------------------------------------------------------------------------------------

@dataclass
class LinearSide:
    """One model's output layer for the teacher side: logits = (hidden[rows] W^T + b) / T, no gradient."""
    hidden: torch.Tensor
    weight: torch.Tensor  # already in the compute dtype
    bias: Optional[torch.Tensor]
    temperature: float

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        h = self.hidden.index_select(0, rows).to(self.weight.dtype)
        if self.temperature != 1.0:
            h = h * (1.0 / self.temperature)
        if self.bias is None:
            return h @ self.weight.T
        return torch.addmm(self.bias, h, self.weight.T)


@dataclass
class KLKernel:
    """Full-vocabulary divergence against a teacher output layer (see reference.per_token_divergence)."""
    teacher: LinearSide
    kind: str
    beta: float
    teacher_may_be_inf: bool = False

    def __call__(self, z: torch.Tensor, rows: torch.Tensor):
        kind, beta = self.kind, self.beta
        if kind == "jsd" and beta == 0.0:
            kind = "forward"
        if kind == "jsd" and beta == 1.0:
            kind = "reverse"
        logp_s = torch.log_softmax(z, dim=-1)
        del z
        logp_t = torch.log_softmax(self.teacher.logits(rows), dim=-1)
        if kind == "forward":
            p_t = logp_t.exp()
            diff = logp_t.sub_(logp_s)  # log p_t - log p_s (reuses the teacher buffer)
            if self.teacher_may_be_inf:
                diff.masked_fill_(p_t == 0, 0.0)
            loss = _rowdot(p_t, diff)
            del diff
            grad = logp_s.exp_().sub_(p_t)  # p_s - p_t
            return loss, grad, None
        if kind == "reverse":
            p_s = logp_s.exp()
            diff = logp_s.sub_(logp_t)  # log p_s - log p_t
            loss = _rowdot(p_s, diff)
            grad = diff.sub_(loss[:, None]).mul_(p_s)  # p_s (log p_s - log p_t - L)
            return loss, grad, None
        log_m = torch.logaddexp(logp_s + math.log(1.0 - beta), logp_t + math.log(beta))
        p_t = logp_t.exp()
        t_diff = logp_t.sub_(log_m)
        if self.teacher_may_be_inf:
            t_diff.masked_fill_(p_t == 0, 0.0)
        kl_t_m = _rowdot(p_t, t_diff)
        del p_t, t_diff
        p_s = logp_s.exp()
        s_diff = logp_s.sub_(log_m)
        del log_m
        kl_s_m = _rowdot(p_s, s_diff)
        loss = beta * kl_t_m + (1.0 - beta) * kl_s_m
        # d/dz_s = p_s (g - sum_v p_s g), g = (1 - beta)(log p_s - log m)
        grad = s_diff.sub_(kl_s_m[:, None]).mul_(p_s).mul_(1.0 - beta)
        return loss, grad, None


@dataclass
class TopKKernel:
    """Top-K distillation against fixed teacher buckets (see reference.topk_distill_loss)."""
    ids: torch.Tensor      # [N, K] int64, invalid slots already mapped to 0
    valid: torch.Tensor    # [N, K] bool
    q: torch.Tensor        # [N, K] teacher bucket probabilities (0 on invalid slots)
    q_tail: torch.Tensor   # [N] teacher tail mass (0 for "renormalize")
    q_logq: torch.Tensor   # [N] sum_b q_b log q_b over all buckets (0 log 0 = 0)
    tail: bool
    forward_kl: bool

    def __call__(self, z: torch.Tensor, rows: torch.Tensor):
        ids, valid = self.ids.index_select(0, rows), self.valid.index_select(0, rows)
        q, q_tail = self.q.index_select(0, rows).to(z.dtype), self.q_tail.index_select(0, rows).to(z.dtype)
        lse = torch.logsumexp(z, dim=-1)
        student_lp = torch.where(valid & (q != 0), z.gather(1, ids) - lse[:, None], torch.zeros_like(q))
        loss = -(q * student_lp).sum(-1)
        if self.tail:
            n = z.shape[0]
            row_idx = torch.arange(n, device=z.device)[:, None].expand_as(ids)[valid]
            z_rest = z.index_put((row_idx, ids[valid]), torch.tensor(-math.inf, dtype=z.dtype, device=z.device))
            lse_rest = torch.logsumexp(z_rest, dim=-1)
            has_tail = q_tail != 0  # a NaN tail weight propagates
            tail_lp = torch.where(has_tail, lse_rest - lse, torch.zeros_like(lse))
            loss = loss - q_tail * tail_lp
            # dL/dz = Q p - scatter(q) - q_tail softmax(z restricted to the non-top-K ids)
            rest_softmax = z_rest.sub_(lse_rest[:, None]).exp_()
            rest_softmax = torch.where(has_tail[:, None], rest_softmax, torch.zeros_like(rest_softmax))
            total = q.sum(-1) + q_tail
            grad = z.sub_(lse[:, None]).exp_().mul_(total[:, None])
            grad.sub_(rest_softmax.mul_(q_tail[:, None]))
        else:
            grad = z.sub_(lse[:, None]).exp_().mul_(q.sum(-1)[:, None])
        grad.scatter_add_(1, ids, -q)
        if self.forward_kl:
            loss = loss + self.q_logq.index_select(0, rows).to(z.dtype)
        return loss, grad, None


@dataclass
class TokenLogprobKernel:
    """log p(token) per row (the 'loss' is the log-prob itself) and, optionally, the entropy as extra."""
    token_ids: torch.Tensor  # [N] int64
    with_entropy: bool

    def __call__(self, z: torch.Tensor, rows: torch.Tensor):
        ids = self.token_ids.index_select(0, rows)
        logp = torch.log_softmax(z, dim=-1)
        del z
        value = logp.gather(1, ids[:, None]).squeeze(1)
        p = logp.exp()
        extra = -_rowdot(p, logp) if self.with_entropy else None
        del logp
        grad = p.neg_()
        grad.scatter_add_(1, ids[:, None], torch.ones_like(value)[:, None])  # onehot - p
        return value, grad, extra


# ----------------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------------

@dataclass
class ChunkPlan:
    """What the Function needs besides the differentiable student tensors."""
    kernel: Callable
    temperature: float
    chunk_size: int
    reduce: bool  # True: output sum_n c_n L_n (scalar); False: c_n L_n per token [N]
    active: Optional[torch.Tensor] = None  # [N] bool, the rows computed (None: all); c_n = 0 elsewhere

    def rows(self, n: int, device) -> torch.Tensor:
        return torch.arange(n, device=device) if self.active is None else torch.nonzero(self.active).view(-1)


def _upcast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype)


def _scaled_bias(bias: Optional[torch.Tensor], dtype, temperature: float) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    b = bias.detach().to(dtype)
    return b * (1.0 / temperature) if temperature != 1.0 else b


def _student_logits(h_rows, weight_c, bias_c, inv_t: float) -> torch.Tensor:
    h_scaled = h_rows * inv_t if inv_t != 1.0 else h_rows
    return h_scaled @ weight_c.T if bias_c is None else torch.addmm(bias_c, h_scaled, weight_c.T)


def _chunk_pass(hidden, weight_c, bias_c, coeff, plan: ChunkPlan, *, want_hidden_grad: bool,
                want_weight_grad: bool, want_bias_grad: bool):
    """One pass over the active rows. Returns (loss [N], extra [N] or None, dh [N,H], dW [V,H], db [V])."""
    n, h_size = hidden.shape
    v = weight_c.shape[0]
    dtype, device = weight_c.dtype, weight_c.device
    inv_t = 1.0 / plan.temperature
    loss = torch.zeros(n, dtype=dtype, device=device)
    extra = None
    grad_h = torch.zeros(n, h_size, dtype=dtype, device=device) if want_hidden_grad else None
    grad_w = torch.zeros(v, h_size, dtype=dtype, device=device) if want_weight_grad else None
    grad_b = torch.zeros(v, dtype=dtype, device=device) if want_bias_grad else None
    active = plan.rows(n, device)
    for start in range(0, active.numel(), plan.chunk_size):
        rows = active[start:start + plan.chunk_size]
        h_rows = hidden.index_select(0, rows).to(dtype)
        # the logits go straight into the kernel, which may free them after its first softmax
        row_loss, dz, row_extra = plan.kernel(_student_logits(h_rows, weight_c, bias_c, inv_t), rows)
        loss.index_copy_(0, rows, row_loss)
        if row_extra is not None:
            if extra is None:
                extra = torch.zeros(n, dtype=dtype, device=device)
            extra.index_copy_(0, rows, row_extra)
        row_coeff = coeff.index_select(0, rows).to(dtype) * inv_t  # d(c L)/d(raw logits) = c/T dL/dz
        if grad_h is not None:
            grad_h.index_copy_(0, rows, (dz @ weight_c).mul_(row_coeff[:, None]))
        if grad_w is not None:
            grad_w.addmm_(dz.T, h_rows.mul_(row_coeff[:, None]))
        if grad_b is not None:
            grad_b.add_(row_coeff @ dz)
        del dz
    return loss, extra, grad_h, grad_w, grad_b


class ChunkedLinearLoss(torch.autograd.Function):
    """Differentiable in (hidden [N,H], weight [V,H], bias [V]); `coeff` [N] are per-token coefficients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, coeff, plan: ChunkPlan):
        dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        weight_c = _upcast(weight, dtype)
        bias_c = _scaled_bias(bias, dtype, plan.temperature)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        precompute_w = plan.reduce and need_w
        precompute_b = plan.reduce and need_b and bias is not None
        loss, extra, grad_h, grad_w, grad_b = _chunk_pass(
            hidden.detach(), weight_c, bias_c, coeff, plan,
            want_hidden_grad=need_h, want_weight_grad=precompute_w, want_bias_grad=precompute_b,
        )
        coeff_c = coeff.to(dtype)
        out = (loss * coeff_c).sum() if plan.reduce else loss * coeff_c
        ctx.plan = plan
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.flags = (need_h, need_w, need_b and bias is not None)
        recompute = (not plan.reduce) and (need_w or (need_b and bias is not None))
        ctx.save_for_backward(grad_h, grad_w, grad_b,
                              hidden.detach() if recompute else None,
                              weight_c if recompute else None,
                              bias_c if recompute else None,
                              coeff if recompute else None)
        if extra is None:  # the per-token losses L_n (0 on the inactive rows, never computed)
            extra = loss
        ctx.mark_non_differentiable(extra)
        return out, extra

    @staticmethod
    def backward(ctx, grad_out, _grad_extra):
        grad_h, grad_w, grad_b, hidden, weight_c, bias_c, coeff = ctx.saved_tensors
        need_h, need_w, need_b = ctx.flags
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        plan: ChunkPlan = ctx.plan
        out_h = out_w = out_b = None
        if plan.reduce:
            g = grad_out.to(grad_h.dtype if grad_h is not None else torch.float32)
            if need_h:
                out_h = (grad_h * g).to(h_dtype)
            if need_w:
                out_w = (grad_w * g).to(w_dtype)
            if need_b:
                out_b = (grad_b * g).to(b_dtype)
            return out_h, out_w, out_b, None, None
        g = grad_out.detach()
        if need_h:
            out_h = (grad_h * g.to(grad_h.dtype)[:, None]).to(h_dtype)
        if need_w or need_b:
            _, _, _, gw, gb = _chunk_pass(hidden, weight_c, bias_c, coeff * g.to(coeff.dtype), plan,
                                          want_hidden_grad=False, want_weight_grad=need_w, want_bias_grad=need_b)
            out_w = gw.to(w_dtype) if need_w else None
            out_b = gb.to(b_dtype) if need_b else None
        return out_h, out_w, out_b, None, None


def run(hidden, weight, bias, coeff, plan: ChunkPlan):
    """Apply the Function; returns (loss, extra): extra is the kernel's extra output when it has one (the
    entropy of TokenLogprobKernel), else the per-token losses L_n [N] (detached)."""
    return ChunkedLinearLoss.apply(hidden, weight, bias, coeff, plan)


@torch.no_grad()
def chunked_topk(hidden, weight, bias, k: int, temperature: float, chunk_size: int):
    """Top-K ids [N, K] and full-vocabulary log-probs [N, K] of (h W^T + b) / T, chunk by chunk."""
    n = hidden.shape[0]
    dtype = torch.float64 if hidden.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    side = LinearSide(hidden.detach(), _upcast(weight, dtype), _scaled_bias(bias, dtype, temperature), temperature)
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(n, start + chunk_size), device=hidden.device)
        z = side.logits(rows)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        values, top = torch.topk(z, k, dim=-1)
        ids[start:start + rows.numel()] = top
        logprobs[start:start + rows.numel()] = (values - lse).to(torch.float32)
    return ids, logprobs


# ----------------------------------------------------------------------------------------------------
# Student logits at given ids: K rows of W per token, never [N, V]
# ----------------------------------------------------------------------------------------------------

def auto_gather_rows(k: int, hidden_size: int, element_bytes: int = 4) -> int:
    """Rows per chunk so that one gathered [rows, K, H] weight buffer takes about CHUNK_BUDGET_BYTES."""
    return max(8, CHUNK_BUDGET_BYTES // max(1, k * hidden_size * element_bytes))


class LogitsAtIds(torch.autograd.Function):
    """z [N, K] = (h_n . W[ids[n, k]] + b[ids[n, k]]) / T for the rows in `rows` (0 elsewhere), differentiable
    in (hidden [N, H], weight [V, H], bias [V]).

    Forward and backward gather W[ids] for `chunk_size` rows at a time ([chunk, K, H]); nothing of size
    [N, V] is built and nothing of size [N, K, H] is kept for the backward. Backward, with g = dL/dz / T:
    dh_n = sum_k g_nk W[id_nk], dW[id_nk] += g_nk h_n, db[id_nk] += g_nk (accumulated in float32, or
    float64 for float64 inputs). A NaN in a computed row reaches the weight gradient in the rows of its ids.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, rows, temperature: float, chunk_size: int):
        dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        n, k = ids.shape
        out = torch.zeros(n, k, dtype=dtype, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start:start + chunk_size]
            chunk_ids = ids.index_select(0, r)
            w = weight.detach()[chunk_ids].to(dtype)  # [c, K, H]
            z = torch.bmm(w, hidden.detach().index_select(0, r).to(dtype).unsqueeze(2)).squeeze(2)
            if bias is not None:
                z = z + bias.detach()[chunk_ids].to(dtype)
            out.index_copy_(0, r, z / temperature)
        ctx.save_for_backward(hidden.detach(), weight.detach(), ids, rows)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, ids, rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = ctx.dtype
        g_all = grad_out.to(dtype) / ctx.temperature
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b and ctx.has_bias else None
        for start in range(0, rows.numel(), ctx.chunk_size):
            r = rows[start:start + ctx.chunk_size]
            chunk_ids = ids.index_select(0, r)
            g = g_all.index_select(0, r)  # [c, K]
            if grad_h is not None:
                w = weight[chunk_ids].to(dtype)
                grad_h.index_copy_(0, r, torch.bmm(g.unsqueeze(1), w).squeeze(1))
            flat_ids = chunk_ids.reshape(-1)
            if grad_w is not None:
                h = hidden.index_select(0, r).to(dtype)
                grad_w.index_add_(0, flat_ids, (g.unsqueeze(2) * h.unsqueeze(1)).reshape(-1, h.shape[1]))
            if grad_b is not None:
                grad_b.index_add_(0, flat_ids, g.reshape(-1))
        out_h = None if grad_h is None else grad_h.to(hidden.dtype)
        out_w = None if grad_w is None else grad_w.to(weight.dtype)
        out_b = None if grad_b is None else grad_b.to(ctx.bias_dtype)
        return out_h, out_w, out_b, None, None, None, None


def logits_at_ids(hidden, weight, bias, ids, rows, temperature: float, chunk_size: int) -> torch.Tensor:
    """Apply `LogitsAtIds`: [N, K] student logits over temperature at ids [N, K] (valid ids in [0, V))."""
    return LogitsAtIds.apply(hidden, weight, bias, ids, rows, temperature, chunk_size)
