"""AdamW, fp32 master weights for low-precision parameters, and the learning-rate schedule (linear
warm-up, then constant or cosine to zero)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

SCHEDULES = ("constant", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW over the trainable `params` (decoupled weight decay on all of them).

    The fused kernel is used when every parameter is a floating-point CUDA tensor, otherwise torch's
    default (multi-tensor foreach where supported).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params must contain at least one tensor that requires grad, got none")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """fp32 master copies of bf16/fp16 trainable parameters, the tensors the optimizer updates.

    An AdamW step of size lr * m / (sqrt(v) + eps) on a bf16 weight w is rounded to w's 8-bit mantissa:
    with lr = 2e-5 and |w| > ~0.005 most updates round away to nothing, and the model does not train.
    Here the optimizer steps the fp32 masters instead: `grads_to_masters()` moves each parameter's
    gradient onto its master (upcast, the parameter's .grad released) and `masters_to_model()` writes the
    rounded masters back. fp32/fp64 parameters are their own masters (no copy). Memory: 4 bytes per
    low-precision parameter, and the optimizer's states are then fp32 too.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.pairs: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        for name, p in params.items():
            master = p.detach().float().clone().requires_grad_(True) if p.dtype in LOW_PRECISION else p
            self.pairs[name] = (p, master)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors to give the optimizer (and to clip)."""
        return [master for _, master in self.pairs.values()]

    def grads_to_masters(self) -> None:
        for p, master in self.pairs.values():
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, master in self.pairs.values():
            if master is not p:
                p.copy_(master)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The master values by parameter name (live tensors, detached)."""
        return {name: master.detach() for name, (_, master) in self.pairs.items()}

    @torch.no_grad()
    def load_state_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """Set masters and parameters from `values` (names and shapes checked by the caller)."""
        for name, (p, master) in self.pairs.items():
            master.copy_(values[name])
            if master is not p:
                p.copy_(master)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """W = ceil(warmup_ratio * total_steps)."""
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    With W = ceil(warmup_ratio * total_steps): step s < W gets (s + 1) / W (so the first step already
    learns, unlike a warm-up that starts at 0); afterwards "constant" gives 1 and "cosine" gives
    0.5 * (1 + cos(pi * (s - W) / (total_steps - W))), which reaches 0 at s = total_steps.
    """
    _check_schedule(schedule, total_steps, warmup_ratio)
    w = warmup_steps(total_steps, warmup_ratio)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, *, schedule: str = "constant", total_steps: int,
                   warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor`; call `.step()` once after every optimizer step."""
    _check_schedule(schedule, total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Factor(schedule, total_steps, warmup_ratio))


class _Factor:
    """Picklable lr lambda (LambdaLR.state_dict keeps callable objects' __dict__)."""

    def __init__(self, schedule: str, total_steps: int, warmup_ratio: float):
        self.schedule = schedule
        self.total_steps = total_steps
        self.warmup_ratio = warmup_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, schedule=self.schedule, total_steps=self.total_steps,
                         warmup_ratio=self.warmup_ratio)


def _check_schedule(schedule: str, total_steps: int, warmup_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not (isinstance(warmup_ratio, (int, float)) and 0 <= warmup_ratio < 1):
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
