"""Measuring a call: device synchronization, median times (CUDA events on a GPU, the host clock on a CPU),
the peak extra device memory of one call, and the resident memory of this process on a CPU (Linux)."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scalar_value(out) -> float | None:
    """float(out) for a one-element tensor (the loss a step returned), else None."""
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return float(out.detach())
    return None


def time_calls(step: Callable[[int], object], n_sets: int, device: torch.device, warmup: int, iters: int,
               clear: Callable[[], None] | None = None) -> dict:
    """Median time of `step(i)` over `iters` calls, i cycling through the `n_sets` input sets, after
    `warmup` calls; also the peak extra device memory of one call and the value it returned.

    Returns {"ms": median milliseconds, "extra_gib": (torch.cuda.max_memory_allocated during step(0)
    minus what was allocated before it) / 2**30 on a GPU, None on a CPU, "value": float of step(0)'s
    scalar output or None}. `clear` (e.g. dropping the gradients earlier calls left) runs before the
    memory baseline is read, so that what step(0) allocates, its outputs included, counts as extra. On a
    GPU each call is timed by CUDA events around it.
    """
    for i in range(warmup):
        step(i % n_sets)
    if clear is not None:
        clear()
    synchronize(device)
    extra_gib = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    value = scalar_value(step(0))
    synchronize(device)
    if device.type == "cuda":
        extra_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    times = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i % n_sets)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "extra_gib": extra_gib, "value": value}


def matmul_ms(hidden: torch.Tensor, weight: torch.Tensor, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of hidden [N, H] @ weight [V, H]^T in their dtype: the unit of the matmul floor."""
    return time_calls(lambda _: hidden @ weight.T, 1, device, warmup, iters)["ms"]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------ resident memory (CPU)
def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (since start, or since `reset_peak_rss`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that an idle worker holds little more
    than its model while another one runs; the peak RSS is unaffected."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
