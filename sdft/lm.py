"""Mechanics of a Hugging Face causal LM that the local backend and the offline Tinker service share:
the output layer, LoRA adapters through peft, and final-norm hidden states of right-padded sequences.

Position p of an input predicts token p + 1, so completion token j of a [prompt (P tokens) | completion]
sequence is predicted by the hidden state at position P - 1 + j; the last completion token is never fed.
Right padding: positions 0..len-1, padding masked out and never gathered.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["output_layer", "check_plain_output_head", "wrap_lora", "hidden_states", "completion_hidden", "causal_lm_of"]


def output_layer(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output layer, which must be a plain nn.Linear. Under
    FSDP2, call it after a forward of the model: the output layer is then gathered (see `sdft.parallel`)."""
    head = causal_lm_of(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output layer must be a plain nn.Linear, got {type(head).__name__}")
    return head.weight, head.bias


def check_plain_output_head(model: nn.Module) -> None:
    """Logits must be exactly hidden @ W.T + b: reject soft-capped or scaled output heads."""
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap is not None or scale not in (None, 1, 1.0):
        raise ValueError(f"model output heads with final_logit_softcapping={softcap!r} or logit_scale={scale!r} "
                         "are not supported; logits must be hidden @ W.T + b")
    output_layer(model)


def wrap_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
              target_modules: str | Sequence[str], seed: int, adapter_name: str = "default"):
    """Wrap `model` in place with a peft LoRA adapter (B = 0, so it starts equal to the base model), its A
    initialized from `seed`. The output layer is never a target (the fused losses read its plain weight)."""
    from peft import LoraConfig, get_peft_model

    head_names = {name for name, module in model.named_modules() if module is model.get_output_embeddings()}
    if isinstance(target_modules, str):
        targets = target_modules
        if targets != "all-linear" and any(h.split(".")[-1] == targets for h in head_names):
            raise ValueError(f"lora_target_modules must not include the output layer, got {targets!r}")
    else:
        targets = list(target_modules)
        if not targets:
            raise ValueError("lora_target_modules must name at least one module, got an empty list")
        bad = [t for t in targets if any(h == t or h.split(".")[-1] == t for h in head_names)]
        if bad:
            raise ValueError(f"lora_target_modules must not include the output layer, got {bad}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config, adapter_name=adapter_name)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a DDP wrapper and/or a peft model (the model itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model: nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Final-norm hidden states [B, L_max, H] of right-padded token lists (position p sees tokens <= p).

    The model's own forward runs (so that wrappers such as peft and FSDP2 do their work) with logits for the
    last position only; the decoder's output is taken by a forward hook, so no [B, L, V] logits are built."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long, device=device)
    attention = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[b, :len(seq)] = 1
    positions = torch.arange(width, device=device).expand(len(sequences), width)
    causal_lm = causal_lm_of(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    captured: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def completion_hidden(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      pad_token_id: int) -> torch.Tensor:
    """Hidden states [sum_i T_i, H] at the positions predicting each completion token, rollout by rollout:
    row j of rollout i is the state at position len(prompt_i) - 1 + j of [prompt_i | completion_i[:-1]]."""
    sequences = [list(p) + list(c[:-1]) for p, c in zip(prompts, completions)]
    hidden = hidden_states(causal_lm, sequences, pad_token_id)
    width = hidden.shape[1]
    index = torch.cat([b * width + len(p) - 1 + torch.arange(len(c)) for b, (p, c) in enumerate(zip(prompts, completions))])
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))
