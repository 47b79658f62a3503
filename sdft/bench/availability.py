"""Which optional paths can run on this machine: each function returns None when the path can run, else a
sentence saying why not (shown in place of its results)."""
from __future__ import annotations

import importlib.util

import torch

LIGER_MISSING = ("liger-kernel not importable (install its wheel: pip install --no-deps liger-kernel, "
                 "or sdft[bench])")
TRL_MISSING = "TRL not installed: pip install 'sdft[bench]'"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton path of sdft.losses cannot run on `device` (its own check: `resolve_impl`), or None."""
    from sdft.losses import resolve_impl

    try:
        resolve_impl("triton", device)
    except ValueError as error:
        return str(error)
    return None


def liger_unavailable_reason() -> str | None:
    """Liger-Kernel's chunked fused linear JSD loss (liger_kernel.chunked_loss)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return LIGER_MISSING
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure is a reason to skip the column
        return f"liger-kernel does not import: {type(error).__name__}: {error}"
    return None


def trl_unavailable_reason() -> str | None:
    """TRL's SDFTTrainer (trl.experimental.sdft, trl >= 1.16)."""
    if importlib.util.find_spec("trl") is None:
        return TRL_MISSING
    try:
        import trl.experimental.sdft  # noqa: F401
    except ImportError as error:
        return f"TRL's SDFTTrainer does not import (needs trl>=1.16): {type(error).__name__}: {error}"
    return None
