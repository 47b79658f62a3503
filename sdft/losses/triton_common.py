"""Building blocks shared by the Triton loss kernels: logit tiles, grouped tile order, an fp32-output
matmul, tile configurations and argument checks.

Conventions used by every kernel in `triton_kl` and `triton_topk`:
  a logit tile is z[rows, cols] / T = (h[rows, :] W[cols, :]^T + b[cols]) / T, accumulated in float32 over
  hidden-size slices (tensor-core dots on bf16/fp16 operands, IEEE fp32 dots on fp32 operands);
  columns past V (and rows past N) are masked; running maxima start at NEG, a finite stand-in for -inf,
  so that exp(m_old - m_new) never evaluates -inf - (-inf);
  a partial softmax statistic is (m, l) with l = sum exp(z - m); partials over vocabulary splits are merged
  on the host side in torch (`merge_softmax`), and log-probabilities are formed as (a - shift) - log_sum.
CPU tensors can only run under the Triton interpreter, whose dot product does not handle bf16/fp16: there
the operands are widened to fp32 before the dot (exact, the products of bf16 values are exact in fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

NEG = -1.0e30
"""Finite stand-in for -inf in running maxima and masked logits (kernels and host code)."""

INT64_MIN = -(2**63)

NEG_C = tl.constexpr(NEG)
INT64_MIN_C = tl.constexpr(INT64_MIN)
"""The same two constants for use inside jit functions (globals there must be constexpr)."""


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of the loss kernels (powers of two, all >= 16).

    block_n x block_v is the logit tile, block_h the hidden-size slice of its dot products; `group`
    row blocks share a column range in the launch order (L2 reuse of weight tiles); `programs` is the
    target number of programs of the vocabulary-split passes (None: 4 per SM on CUDA, 2 per row block on
    CPU). mm_* configure the fp32-output matmul used for dh = dZ W and dW = dZ^T h.
    """
    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    group: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs: Optional[int] = None
    mm_block_m: int = 128
    mm_block_n: int = 128
    mm_block_k: int = 64
    mm_num_warps: int = 8
    mm_num_stages: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h", "mm_block_m", "mm_block_n", "mm_block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name}={value!r} must be a power of two >= 16")
        for name in ("group", "num_warps", "num_stages", "mm_num_warps", "mm_num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TileConfig.{name}={value!r} must be an int >= 1")
        if self.programs is not None and (not isinstance(self.programs, int) or self.programs < 1):
            raise ValueError(f"TileConfig.programs={self.programs!r} must be None or an int >= 1")


CUDA_TILES = TileConfig()
"""Starting point for H100-class GPUs (tune with scripts/bench_losses_gpu.py --sweep)."""

INTERPRETER_TILES = TileConfig(block_n=16, block_v=32, block_h=32, group=2, num_warps=1, num_stages=1,
                               mm_block_m=32, mm_block_n=32, mm_block_k=32, mm_num_warps=1, mm_num_stages=1)
"""Small tiles for CPU tensors (the Triton interpreter runs one program at a time)."""


def default_tiles(device: torch.device) -> TileConfig:
    return CUDA_TILES if device.type == "cuda" else INTERPRETER_TILES


def vocab_splits(cfg: TileConfig, n_row_blocks: int, n_col_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) so that row blocks x splits reaches the target program count."""
    if cfg.programs is not None:
        target = cfg.programs
    elif device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * n_row_blocks
    splits = max(1, min(n_col_tiles, -(-target // max(1, n_row_blocks))))
    per_split = -(-n_col_tiles // splits)
    return -(-n_col_tiles // per_split), per_split


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """Kernel constexprs for dots on operands of `dtype`: IEEE fp32 for fp32 inputs, widened on CPU."""
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "WIDEN": device.type != "cuda"}


def merge_softmax(m: torch.Tensor, l: torch.Tensor):
    """Merge partial (max, sum-exp) pairs [S, N] over vocabulary splits.

    Returns (shift [N], log_sum [N], weights [S, N]) with lse = shift + log_sum, shift = max_s m_s and
    log_sum = log(sum_s l_s exp(m_s - shift)) (-inf where every l_s is 0); weights = exp(m_s - shift)
    rescale any other partial sum accumulated against m_s. Kernels use log p = (a - shift) - log_sum, which
    stays exact near the maximum even when |a| is large (a - shift is computed without rounding there).
    """
    shift = m.max(dim=0).values
    w = torch.exp(m - shift)
    return shift, torch.log((l * w).sum(dim=0)), w


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------
# argument checks (the public dispatcher validates first; these guard direct calls)
# ----------------------------------------------------------------------------------------------------

_LOW = (torch.bfloat16, torch.float16, torch.float32)


def check_pair(prefix: str, hidden, weight, bias) -> tuple[int, int, int]:
    """hidden [N, H] and weight [V, H] of one dtype in {bf16, fp16, fp32}, bias [V]; returns (N, H, V)."""
    for name, t, ndim in ((f"{prefix}_hidden", hidden, 2), (f"{prefix}_weight", weight, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _LOW:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton path allows bfloat16, float16, float32")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{prefix}_hidden ({hidden.dtype}) and {prefix}_weight ({weight.dtype}) must share one "
                         "dtype on the Triton path")
    n, h = hidden.shape
    v, hw = weight.shape
    if hw != h:
        raise ValueError(f"{prefix}_weight has shape {tuple(weight.shape)}; expected [V, {h}] to match "
                         f"{prefix}_hidden {tuple(hidden.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (v,)):
        raise ValueError(f"{prefix}_bias must have shape [{v}], got {getattr(bias, 'shape', type(bias).__name__)}")
    for name, t in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}_hidden is on {hidden.device}")
    return n, h, v


def check_scale(token_scale, n: int, device) -> torch.Tensor:
    if not isinstance(token_scale, torch.Tensor) or token_scale.shape != (n,):
        raise ValueError(f"token_scale must be a tensor of shape [{n}], got "
                         f"{getattr(token_scale, 'shape', type(token_scale).__name__)}")
    if token_scale.device != device:
        raise ValueError(f"token_scale is on {token_scale.device} but the hidden states are on {device}")
    return token_scale.detach().to(torch.float32).contiguous()


def check_active(active, scale: torch.Tensor) -> torch.Tensor:
    """The rows to compute [N] bool: `active` when given, else the rows with a nonzero coefficient."""
    if active is None:
        return scale != 0
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.shape != scale.shape:
        raise ValueError(f"active must be a bool tensor of shape {list(scale.shape)}, got "
                         f"{getattr(active, 'dtype', type(active).__name__)} {tuple(getattr(active, 'shape', ()))}")
    if active.device != scale.device:
        raise ValueError(f"active is on {active.device} but the hidden states are on {scale.device}")
    return active


def kernels_run_in_interpreter() -> bool:
    """True when this process built the kernels for the Triton interpreter (TRITON_INTERPRET=1 was set before
    triton was first imported), which runs them on CPU tensors."""
    return type(logit_tile).__name__ == "InterpretedFunction"


def check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float)) or not (0 < temperature < math.inf):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    return float(temperature)


def clean_bias(bias) -> Optional[torch.Tensor]:
    """Bias as contiguous fp32, -inf entries clamped to NEG (probability 0 without inf - inf = nan)."""
    if bias is None:
        return None
    return bias.detach().to(torch.float32).clamp(min=NEG).contiguous()


# ----------------------------------------------------------------------------------------------------
# jit building blocks
# ----------------------------------------------------------------------------------------------------

@triton.jit
def grouped_tile(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """Program id -> (row block, column block), GROUP row blocks sweeping the columns together."""
    per_group = GROUP * n_col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_rows, n_cols, n_hidden, stride_hn, stride_hh,
               stride_wv, stride_wh, temperature,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """(h[offs_n] W[offs_v]^T + b[offs_v]) / T as float32 [BLOCK_N, BLOCK_V]; masked rows/cols read zeros."""
    row_ok = offs_n < n_rows
    col_ok = offs_v < n_cols
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, n_hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < n_hidden
        a = tl.load(h_rows + offs_h[None, :] * stride_hh, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w_cols + offs_h[:, None] * stride_wh, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0)[None, :]
    return acc / temperature


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """C[M, N] (+)= A[M, K] B[K, N] with float32 accumulation and a float32 C."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool, cfg: TileConfig,
                exact_fp32: bool) -> torch.Tensor:
    """out [M, N] float32 (+)= a [M, K] @ b [K, N] (any strides). Operands are cast to a's dtype inside
    the kernel (bf16 tensor-core dots), or to fp32 when a is fp32 or on CPU; `exact_fp32` selects IEEE
    fp32 dots instead of TF32 for fp32 operands."""
    m, k = a.shape
    k2, n = b.shape
    if k2 != k or out.shape != (m, n) or out.dtype != torch.float32:
        raise ValueError(f"matmul_fp32: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} "
                         f"({out.dtype}) do not form out[M, N] = a[M, K] b[K, N] in float32")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out.zero_()
        return out
    widen = a.device.type != "cuda" or a.dtype == torch.float32
    dot_dtype = tl.float32 if widen else (tl.bfloat16 if a.dtype == torch.bfloat16 else tl.float16)
    grid = (triton.cdiv(m, cfg.mm_block_m) * triton.cdiv(n, cfg.mm_block_n),)
    _matmul_kernel[grid](
        a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, PRECISION="ieee" if exact_fp32 else "tf32",
        BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k, GROUP=cfg.group,
        num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
    )
    return out
