"""Liger-Kernel's `LigerFusedLinearJSDLoss` (chunked, torch.compile) as a comparison path.

Configured as a pure distillation loss: hard-loss weight 0, soft-loss weight 1, Liger's beta 0 = forward
KL(teacher || student), 1 = reverse KL, in between its generalized JSD with the teacher's weight beta (the
same mixture as `sdft.losses` kind="jsd"); the result is the mean over tokens (labels are given but no
label equals its ignore_index), i.e. reduction "token_mean". It always computes the gradient of the
output-layer weight, whether or not the weight requires it: "equal settings" with sdft's path are the
rows with the weight gradient. torch.compile is used on CUDA only (on a CPU the same code runs eagerly).
"""
from __future__ import annotations

import inspect

import torch

LIGER_BETA = {"forward": 0.0, "reverse": 1.0}


def liger_distill_loss(kind: str, beta: float, device: torch.device):
    """A `LigerFusedLinearJSDLoss` computing `kind` ("forward", "reverse" or "jsd" with teacher weight
    `beta`); called as loss(student_hidden [N,H], student_weight [V,H], teacher_hidden [N,H],
    teacher_weight [V,H], labels [N]) -> the mean over tokens."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    wanted = {"beta": LIGER_BETA.get(kind, beta), "weight_hard_loss": 0.0, "weight_soft_loss": 1.0,
              "temperature": 1.0, "compiled": device.type == "cuda"}
    params = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    return LigerFusedLinearJSDLoss(**{k: v for k, v in wanted.items() if k in params})
