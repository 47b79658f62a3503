"""LoRA weights merged for decoding, without touching the trained or base weights.

A peft LoRA linear computes y = x W^T + s (x A^T) B^T: two extra small matrix products per adapted layer
and token, which dominate the cost of decoding one token at a time on small batches. Inside
`merged_lora(model)` every adapted linear of the active adapter instead holds a merged copy
W' = W + s B A (computed in W's dtype) and the adapter path is switched off, so each layer is one matrix
product; on exit the original weight tensors are put back, bit for bit (the copy replaces the storage the
parameter points to; W itself is never modified, so no rounding drift builds up over training).

Costs: one copy of the adapted weights while inside. Precision: W' is rounded to W's dtype; in fp32 the
outputs match the unmerged layers to rounding (about 1e-6 relative), but in bf16/fp16 the rounding of
W + s B A can swallow small adapter updates, which is why `should_merge` merges fp32/fp64 weights only
unless asked otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

MERGE_MODES = ("auto", "always", "never")


def should_merge(model: nn.Module, mode: str) -> bool:
    """"always" / "never" as said; "auto": merge when the model's weights are float32 or float64."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge_lora must be one of {', '.join(MERGE_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return next(model.parameters()).dtype in (torch.float32, torch.float64)


@contextmanager
def merged_lora(peft_model: nn.Module) -> Iterator[nn.Module]:
    """Inside: the peft model's active adapter merged into copies of its base weights, adapters off (yields
    the model). Plain LoRA on nn.Linear layers only (no DoRA or other variants, no already-merged layers)."""
    from peft.tuners.lora.layer import Linear as LoraLinear, LoraLayer

    adapter = peft_model.active_adapter
    layers = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or not isinstance(module.base_layer, nn.Linear):
            raise ValueError(f"merged_lora: {name} is a {type(module).__name__} on a "
                             f"{type(module.base_layer).__name__}; only LoRA on nn.Linear layers can be merged")
        if adapter in getattr(module, "lora_variant", {}) or module.merged:
            raise ValueError(f"merged_lora: {name} uses a LoRA variant or is already merged; sample without "
                             "merging (merge_lora=never)")
        layers.append(module)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in layers:
                weight = module.base_layer.weight
                merged = weight.data + module.get_delta_weight(adapter).to(weight.dtype)
                originals.append((weight, weight.data))
                weight.data = merged
        with peft_model.disable_adapter():
            yield peft_model
    finally:
        for weight, data in originals:
            weight.data = data
