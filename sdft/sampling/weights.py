"""The policy's weights as an inference engine loads them: (checkpoint name, tensor) pairs, one at a time.

An engine that holds its own copy of the student (vLLM) is refreshed from this stream after the student
changes. Every weight of the model is streamed, under its Hugging Face checkpoint name; a linear layer
that carries a peft LoRA adapter is streamed merged, W + (alpha / r) B A for its active adapters, under
the base layer's name (`model.layers.0.self_attn.q_proj.weight`), and the adapter's own matrices are not.
A complete stream lets the engine reload every layer as a whole (fused q/k/v and gate/up layers, kernels
repacked after loading). Each tensor is made only when the consumer asks for it, so a consumer that loads
as it reads holds one extra tensor at a time (a sharded student can gather its parameters one at a time
in the same way).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = ["policy_weights"]


def policy_weights(causal_lm: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of the policy decoded from `causal_lm` (for a peft student, the base
    model with the adapter layers injected), LoRA layers merged; tied weights once; detached."""
    lora_layers = {name: module for name, module in causal_lm.named_modules()
                   if getattr(module, "base_layer", None) is not None and hasattr(module, "get_delta_weight")}
    for name, parameter in causal_lm.named_parameters():
        owner, _, leaf = name.rpartition(".")
        layer_name = next((n for n in lora_layers if owner == n or owner.startswith(n + ".")), None)
        if layer_name is None:
            yield name, _whole(parameter.detach())
        elif owner == f"{layer_name}.base_layer" if layer_name else owner == "base_layer":
            yield f"{layer_name}.{leaf}" if layer_name else leaf, _whole(_merged(lora_layers[layer_name], leaf))
        # else: the adapter's own matrices (lora_A, lora_B, ...), folded into the merged weight


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole: a collective call, one tensor at a time."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _merged(layer: nn.Module, leaf: str) -> torch.Tensor:
    """The base layer's `leaf` parameter with the active adapters' deltas added (weights only)."""
    with torch.no_grad():
        tensor = getattr(layer.base_layer, leaf).detach()
        if leaf == "weight" and not getattr(layer, "disable_adapters", False):
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        return tensor
