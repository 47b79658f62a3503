"""Argument validation shared by every loss path. Errors name the argument, the value and what is allowed."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KL_KINDS = ("forward", "reverse", "jsd")
TOPK_NORMALIZE = ("renormalize", "tail")
TOPK_KINDS = ("cross_entropy", "forward_kl", "reverse_kl")
TOPK_RENORMALIZE_ONLY = ("reverse_kl",)
"""Top-K kinds defined only for normalize="renormalize"."""
REDUCTIONS = ("none", "sum", "token_mean", "seq_mean")
IMPLS = ("auto", "reference", "chunked", "triton")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast, never the reverse)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_choice(name: str, value, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_float_tensor(name: str, tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {tensor.dtype}; allowed: float32, bfloat16, float16, float64")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta={beta!r} must be a number in [0, 1] (the teacher's weight in the mixture)")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None (automatic) or an int >= 1")


def check_token_vector(name: str, tensor, n: int, device, *, integer: bool = False, boolean: bool = False):
    """Validate an optional per-token vector of length n (mask, weights, seq_ids, token ids)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [{n}], got {type(tensor).__name__}")
    if tensor.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one entry per token), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the loss inputs are on {device}")
    if boolean and tensor.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = token counts), got dtype {tensor.dtype}")
    if integer and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    if not integer and not boolean and not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def check_linear(prefix: str, hidden, weight, bias) -> tuple[int, int, int]:
    """Check hidden [N,H], weight [V,H], bias [V] of one model; return (N, H, V)."""
    check_float_tensor(f"{prefix}_hidden", hidden, 2)
    check_float_tensor(f"{prefix}_weight", weight, 2)
    n, h = hidden.shape
    v, hw = weight.shape
    if hw != h:
        raise ValueError(
            f"{prefix}_weight has shape {tuple(weight.shape)} but {prefix}_hidden has hidden size {h}; "
            f"expected {prefix}_weight of shape [V, {h}]"
        )
    if bias is not None:
        check_float_tensor(f"{prefix}_bias", bias, 1)
        if bias.shape != (v,):
            raise ValueError(f"{prefix}_bias must have shape [{v}] (the vocabulary), got {tuple(bias.shape)}")
    check_same_device(**{f"{prefix}_hidden": hidden, f"{prefix}_weight": weight, f"{prefix}_bias": bias})
    return n, h, v


def check_topk_inputs(topk_ids, topk_logprobs, n: int, device, *, logprobs_name: str = "topk_logprobs") -> int:
    """topk_ids [N, K] integer and the teacher's log-probs [N, K] (argument `logprobs_name`); returns K."""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a 2-D tensor [N, K], got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    check_float_tensor(logprobs_name, topk_logprobs, 2)
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and {logprobs_name} {tuple(topk_logprobs.shape)} must "
                         "have the same shape")
    if topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but the student has {n} tokens")
    check_same_device(**{"student": torch.empty(0, device=device), "topk_ids": topk_ids, logprobs_name: topk_logprobs})
    return topk_ids.shape[1]


def check_topk_kind(kind: str, normalize: str) -> None:
    check_choice("normalize", normalize, TOPK_NORMALIZE)
    check_choice("kind", kind, TOPK_KINDS)
    if kind in TOPK_RENORMALIZE_ONLY and normalize != "renormalize":
        raise ValueError(f"kind={kind!r} needs normalize='renormalize' (the reverse KL between the renormalized "
                         f"top-K distributions), got normalize={normalize!r}")


def check_vocab_size(vocab_size) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 1 (the size of the full vocabulary)")
