"""How this process takes part in a run: alone, as a data-parallel replica (DDP), or holding 1/world of the
weights (FSDP2), on existing engines.

`accelerate launch` starts the processes and says what the user asked for (its config file becomes
environment variables); `setup_parallel` reads that and never ignores it:
  - one process: plain PyTorch;
  - several processes, no FSDP: DDP through `accelerate.Accelerator.prepare` (gradients averaged by DDP);
  - `distributed_type: FSDP` with `fsdp_version: 2`: the student (and a full-fine-tuning teacher copy) sharded
    with `torch.distributed.fsdp.fully_shard` on a 1-D device mesh, with the plugin's settings
    (`accelerate.utils.FullyShardedDataParallelPlugin`: reshard_after_forward, cpu offload,
    cpu_ram_efficient_loading, state dict type). sdft applies `fully_shard` itself rather than through
    `Accelerator.prepare`, because accelerate enables FSDP only on GPU-type backends; one code path on
    every device keeps the 2-process CPU tests (gloo) a test of what runs on GPUs;
  - DeepSpeed, FSDP1, Megatron-LM or tensor/context parallelism: an error naming FSDP2 as the supported path.
On a machine without a GPU, the processes use the CPU and gloo.

Sharding (`shard_model`): every transformer block (the model's `_no_split_modules`) is one FSDP unit; the
final norm and the output layer (and the input embedding when tied to it) form a unit that stays gathered
after the forward (`reshard_after_forward=False`), so the fused losses read the whole output layer
[V, H] right after the forward that produced the hidden states, and its gradient is reduce-scattered by
FSDP like any other; the root module is the last unit. Gradients are averaged over ranks by DDP and FSDP
alike, so a loss that is a sum over ranks is multiplied by world_size before backward (`loss_scale`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

__all__ = ["Parallel", "setup_parallel", "shard_model", "copy_whole", "load_on_main_only",
           "UNSUPPORTED_LAUNCHERS"]

UNSUPPORTED_LAUNCHERS = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
FSDP2_HINT = ("the supported way to shard is FSDP2: accelerate launch --config_file configs/accelerate/fsdp2.yaml "
              "scripts/train.py ...")


@dataclass
class Parallel:
    """This process's place in a run. `mode`: "single", "ddp" or "fsdp2"; `mesh`: the 1-D device mesh (fsdp2);
    `mixed_precision`: bf16 compute over fp32 sharded weights (fsdp2 with model.dtype=bfloat16 and
    optim.master_weights); `reshard_after_forward`, `cpu_offload`: the FSDP plugin's settings."""

    mode: Literal["single", "ddp", "fsdp2"] = "single"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None
    mesh: Any = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    ram_efficient_loading: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp2"

    @property
    def loss_scale(self) -> float:
        """Multiply a loss that is summed over ranks by this before backward: DDP and FSDP average gradients."""
        return float(self.world_size) if self.mode != "single" else 1.0

    # ---------------------------------------------------------------------------------- models
    def prepare_trainable(self, model: nn.Module, *, mixed_precision: bool = False) -> nn.Module:
        """The student as this process trains it: itself, wrapped in DDP, or sharded (in place)."""
        if self.mode == "ddp":
            return self.accelerator.prepare_model(model)
        return self.prepare_frozen(model, mixed_precision=mixed_precision)

    def prepare_frozen(self, model: nn.Module, *, mixed_precision: bool = False) -> nn.Module:
        """A second model (a full-fine-tuning teacher): sharded like the student under FSDP2, else as it is.

        A model on the meta device (RAM-efficient loading: `load_on_main_only`) gets its shards from the main
        process's copy, sent with `set_model_state_dict(broadcast_from_rank0=True)`; non-persistent buffers
        (rotary frequencies) are broadcast too."""
        if self.mode != "fsdp2":
            return model
        on_meta = any(p.is_meta for p in model.parameters())
        streamed = self.any(on_meta)
        if streamed and self.sum([float(on_meta == self.is_main)])[0]:
            raise ValueError("RAM-efficient loading needs the weights on the main process and the meta device on the "
                             "others")
        whole = model.state_dict() if self.is_main and streamed else {}
        buffers = _non_persistent_buffers(model)
        shard_model(model, self.mesh, reshard_after_forward=self.reshard_after_forward, cpu_offload=self.cpu_offload,
                    mixed_precision=mixed_precision)
        if streamed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            if on_meta:
                model.to_empty(device=self.device)
            set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
            for name, buffer in _non_persistent_buffers(model).items():
                if not self.is_main:
                    buffer.zero_()
                else:
                    buffer.copy_(buffers[name])
                torch.distributed.broadcast(buffer, src=0)
        return model

    def release(self, model: nn.Module) -> None:
        """FSDP2: shard again what a no-gradient forward left gathered (the output-layer unit); else nothing."""
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module inside a DDP wrapper (FSDP2 modules are not wrapped)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """DDP: no gradient all-reduce in this backward (all but the last micro-batch of a step). FSDP2 keeps
        reduce-scattering every micro-batch (accumulating sharded gradients needs no full-size buffer)."""
        if skip and self.mode == "ddp":
            return model.no_sync()
        return contextlib.nullcontext()

    def share_generate(self, generate):
        """A GenerateFn that gives each process every world_size-th prompt, padded to equal shares (under FSDP2
        each decoding step is collective), and returns every completion, in order, on every process."""
        if self.mode == "single":
            return generate

        def shared(prompts, max_new_tokens):
            share = list(prompts[self.rank::self.world_size])
            width = -(-len(prompts) // self.world_size)
            padded = share + [prompts[0]] * (width - len(share))
            mine = generate(padded, max_new_tokens)[:len(share)] if padded else []
            parts = self.gather(mine)
            out: list = [None] * len(prompts)
            for rank, part in enumerate(parts):
                out[rank::self.world_size] = part
            return out
        return shared

    # --------------------------------------------------------------------------------- numbers
    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        if self.mode == "single":
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on some process."""
        return self.sum([1.0 if flag else 0.0])[0] > 0.0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (picklable objects)."""
        if self.mode == "single":
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.mode != "single":
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every process, then tear the process group down while the interpreter is still whole.
        A gloo group left to interpreter shutdown can abort the process (SIGABRT) when its worker threads
        release the last tensors of finished collectives after Python is gone."""
        if self.mode != "single" and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    @property
    def _collective_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def setup_parallel() -> Parallel:
    """The Parallel of this process from what `accelerate launch` (or torchrun) set up; one process otherwise.
    Raises for launcher configurations sdft does not run, naming the supported one."""
    for variable, name in UNSUPPORTED_LAUNCHERS.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise ValueError(f"the launcher asks for {name}, which sdft does not support; {FSDP2_HINT}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if use_fsdp:
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"the launcher asks for FSDP version {version}; sdft shards with FSDP2 only "
                             f"(fsdp_version: 2); {FSDP2_HINT}")
    if world_size <= 1 and not use_fsdp:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Parallel(device=device)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    state = accelerator.state
    if getattr(state, "parallelism_config", None) is not None and getattr(state.parallelism_config, "non_data_parallel_size", 1) > 1:
        raise ValueError(f"the launcher asks for tensor or context parallelism, which sdft does not run; {FSDP2_HINT}")
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        raise ValueError(f"the launcher asks for mixed_precision={os.environ['ACCELERATE_MIXED_PRECISION']}; sdft "
                         "takes the precision from the run config instead (model.dtype=bfloat16, with "
                         "optim.master_weights for fp32 master weights): set mixed_precision: 'no' in the launcher")
    base = dict(rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device,
                accelerator=accelerator)
    if not use_fsdp:
        return Parallel(mode="ddp", **base, notes=[f"data parallel (DDP) over {accelerator.num_processes} processes"])
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh

    plugin = FullyShardedDataParallelPlugin()
    if plugin.activation_checkpointing:
        raise ValueError("the launcher asks for FSDP activation checkpointing; sdft turns it on with "
                         "model.gradient_checkpointing=true: set fsdp_activation_checkpointing: false in the launcher")
    wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if wrap != "TRANSFORMER_BASED_WRAP":
        raise ValueError(f"the launcher asks for fsdp_auto_wrap_policy={wrap}; sdft shards by transformer block "
                         "(TRANSFORMER_BASED_WRAP)")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    return Parallel(mode="fsdp2", **base, mesh=mesh, reshard_after_forward=bool(plugin.reshard_after_forward),
                    cpu_offload=plugin.cpu_offload is not None and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
                    ram_efficient_loading=bool(plugin.cpu_ram_efficient_loading),
                    notes=[f"FSDP2 over {accelerator.num_processes} processes (each holds 1/"
                           f"{accelerator.num_processes} of the weights)"
                           + ("; weights loaded by the main process only and sent as shards"
                              if plugin.cpu_ram_efficient_loading else "")])


def shard_model(model: nn.Module, mesh, *, reshard_after_forward: bool = True, cpu_offload: bool = False,
                mixed_precision: bool = False) -> nn.Module:
    """Apply FSDP2 in place (see the module docstring for the units) and return the model. `mixed_precision`:
    the weights are fp32 shards gathered as bf16 for compute, gradients reduced in fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs: dict[str, Any] = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    block_names = set(getattr(causal_lm, "_no_split_modules", None) or [])
    blocks = [m for m in causal_lm.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"cannot shard {type(causal_lm).__name__}: it names no transformer block class "
                         "(_no_split_modules); FSDP2 shards one unit per block")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    embed, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    norm = getattr(decoder, "norm", None)
    tied = embed is not None and head is not None and embed.weight is head.weight
    if embed is not None and not tied:
        fully_shard(embed, reshard_after_forward=reshard_after_forward, **kwargs)
    tail = [m for m in (norm, head, embed if tied else None) if m is not None]
    fully_shard(tail, reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


@torch.no_grad()
def copy_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """target <- value, where target may be one process's shard (DTensor) of the whole `value`, or `value` a
    DTensor laid out like target."""
    if hasattr(target, "device_mesh") and not hasattr(value, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                  target.placements)
    target.copy_(value)


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers not in the state dict (e.g. rotary inverse frequencies), by name."""
    persistent = set(model.state_dict())
    return {name: buffer for name, buffer in model.named_buffers() if name not in persistent}


def load_on_main_only(settings, parallel: "Parallel", *, dtype: torch.dtype):
    """(model, tokenizer) for RAM-efficient FSDP2 loading: the main process loads the weights (in `dtype`), the
    others build the same model on the meta device (no memory) and receive their shards when it is sharded."""
    from sdft.models import configured_tokenizer, load_configured, resolve_model_path

    if parallel.is_main:
        return load_configured(settings, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = resolve_model_path(settings.name, cache_dir=settings.cache_dir)
    hub = {} if os.path.isdir(source) else {"revision": settings.revision,
                                            "trust_remote_code": settings.trust_remote_code}
    config = AutoConfig.from_pretrained(source, **hub)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **({"trust_remote_code": True}
                                                                         if settings.trust_remote_code else {}))
    try:
        model.generation_config = GenerationConfig.from_pretrained(source, **hub)
    except OSError:
        pass  # no generation_config.json: the one built from the config, as on the main process
    tokenizer = configured_tokenizer(settings)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
