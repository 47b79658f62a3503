"""The local backend: a Hugging Face causal LM (LoRA via peft, or full fine-tuning) on this machine.

Mechanisms only: the student model and its optimizer (`sdft.optim`), the teacher's weights
(`sdft.teacher`: static, EMA or sync), decoding (`sdft.sampling`: native or vLLM) and the final-norm hidden
states at completion positions (`sdft.lm`). What the loss is, and what it needs from the teacher, is the
objective's (`sdft.objectives`). No [tokens, vocab] logits are materialized outside decoding: the
teacher's outputs and the student's loss go through the fused functions of `sdft.losses` on the gathered
hidden states and the output layer's weight.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import torch
from torch import nn

from sdft.backends.base import check_rollouts, check_sft_batch, check_teacher_prompts
from sdft.config import GenerationConfig, ModelConfig, OptimConfig, StudentConfig, TeacherConfig
from sdft.lm import causal_lm_of, check_plain_output_head, completion_hidden, output_layer, wrap_lora
from sdft.parallel import Parallel, copy_whole
from sdft.losses import fused_linear_token_logprobs, fused_linear_topk
from sdft.objectives import (FullVocabTargets, Objective, SampledTargets, StepSums, StudentTokens, Targets,
                             TeacherRequest, TopKTargets)
from sdft.optim import LOW_PRECISION, MasterWeights, build_optimizer, build_schedule
from sdft.sampling import Rollout, SamplingParams, build_sampler
from sdft.sampling.base import padding_token_id
from sdft.checkpoint import check_state_tensors
from sdft.teacher import build_teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class LocalBackend:
    """SDFT on a local Hugging Face causal LM; implements `sdft.backends.base.Backend`.

    The backend takes ownership of `model`: it is cast to model.dtype, moved to `device`, for
    student.mode="lora" wrapped in place by peft (adapter B initialized to zero, so the student starts equal
    to the base model; A drawn from `seed`), and prepared for `parallel` (`sdft.parallel`: as it is, a DDP
    replica, or FSDP2 shards; a full-fine-tuning teacher copy is sharded the same way). Under full fine-tuning
    of bf16 weights with optim.master_weights, AdamW updates fp32 master copies (`sdft.optim.MasterWeights`;
    under FSDP2 the shards themselves are fp32 and computed in bf16). `forward_batch_size` bounds the sequences
    per teacher forward. Decoding goes through the sampler of generation.engine (`sdft.sampling.build_sampler`;
    vllm needs `model_path`, the folder the model was loaded from; `sampler_seed` seeds the sampler's own
    generator for prompts without seeds), told after every optimizer step and loaded checkpoint that the
    weights changed.
    """

    def __init__(self, model: nn.Module, tokenizer, *, student: StudentConfig = StudentConfig(),
                 teacher: TeacherConfig = TeacherConfig(mode="static"), optim: OptimConfig = OptimConfig(),
                 generation: GenerationConfig = GenerationConfig(), model_settings: ModelConfig = ModelConfig(),
                 steps: int = 1, device: str | torch.device | None = None, seed: int = 0,
                 sampler_seed: int | None = None, parallel: Parallel = Parallel(), forward_batch_size: int = 8,
                 model_path: str | None = None):
        check_plain_output_head(model)
        self.tokenizer = tokenizer
        self.notes: list[str] = list(parallel.notes)
        self.student_mode = student.mode
        self.optim_settings = optim
        self.parallel = parallel
        self.forward_batch_size = forward_batch_size
        weights_dtype = self.weights_dtype_of(model_settings, optim, parallel)
        sharded_masters = weights_dtype != DTYPES[model_settings.dtype]  # bf16 compute over fp32 shards
        if not any(p.is_meta for p in model.parameters()):  # (meta: filled from the main process when sharded)
            model.to(dtype=weights_dtype)
            if device is not None:
                model.to(device)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if student.mode == "lora":
            model = wrap_lora(model, rank=student.lora_rank, alpha=student.lora_alpha, dropout=student.lora_dropout,
                              target_modules=list(student.lora_target_modules), seed=seed)
        else:
            model.requires_grad_(True)
        if model_settings.gradient_checkpointing:
            causal_lm_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.teacher = build_teacher(model, mode=teacher.mode, ema_alpha=teacher.ema_alpha, ema_fp32=teacher.ema_fp32,
                                     sync_every=teacher.sync_every if teacher.mode == "sync" else None, bind=False)
        self.model = parallel.prepare_trainable(model, mixed_precision=sharded_masters)
        if self.teacher.module is not None:
            self.teacher.module = parallel.prepare_frozen(self.teacher.module, mixed_precision=sharded_masters)
        self.teacher.bind(self.model)
        trainable = self._trainable()
        low = student.mode == "full" and not parallel.sharded and any(p.dtype in LOW_PRECISION for p in trainable.values())
        self.masters = MasterWeights(trainable) if optim.master_weights and low else None
        self.optimizer = build_optimizer(self.masters.parameters() if self.masters else trainable.values(),
                                         lr=optim.lr, weight_decay=optim.weight_decay, beta1=optim.beta1,
                                         beta2=optim.beta2, eps=optim.eps)
        self.scheduler = build_schedule(self.optimizer, schedule=optim.schedule, total_steps=steps,
                                        warmup_ratio=optim.warmup_ratio)
        self.sampler = build_sampler(generation, self.module, tokenizer,
                                     seed=seed if sampler_seed is None else sampler_seed, model_path=model_path,
                                     dtype=model_settings.dtype, sync_stop=parallel.any if parallel.sharded else None)
        self.pad_token_id = padding_token_id(tokenizer, self.sampler.stop_ids)

    # ----------------------------------------------------------------------------------------- model
    @staticmethod
    def weights_dtype_of(model_settings: ModelConfig, optim: OptimConfig, parallel: Parallel) -> torch.dtype:
        """The dtype the weights are held in: model.dtype, except fp32 under FSDP2 when bf16 compute keeps fp32
        master weights (the shards are the masters)."""
        dtype = DTYPES[model_settings.dtype]
        return torch.float32 if parallel.sharded and dtype in LOW_PRECISION and optim.master_weights else dtype

    @classmethod
    def weights_dtype(cls, config, parallel: Parallel) -> torch.dtype:
        """`weights_dtype_of` for a run config: load the model in it directly."""
        return cls.weights_dtype_of(config.model, config.optim, parallel)

    @property
    def module(self) -> nn.Module:
        """The student's root module for computations without gradient sync (a DDP replica's inner module)."""
        return self.parallel.unwrap(self.model)

    def _trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by their unwrapped names (the same under DDP, FSDP2 and one process)."""
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -------------------------------------------------------------------------------------- decoding
    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One completion per prompt from the student (adapter enabled), see `Sampler.sample`."""
        return self.sampler.sample(prompt_ids, params, seeds=seeds)

    def generate_greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        batch_size: int | None = None) -> list[list[int]]:
        return self.sampler.greedy(prompt_ids, max_new_tokens, batch_size=batch_size)

    # --------------------------------------------------------------------------------------- teacher
    def teacher_targets(self, teacher_prompt_ids: Sequence[Sequence[int]], rollouts: Sequence[Rollout],
                        objective: Objective) -> Targets:
        """Run the teacher on [teacher prompt | completion] and return, per rollout, what the objective's
        TeacherRequest asks for, with the teacher's entropy per token (at the request's temperature)."""
        prompts, rollouts = check_teacher_prompts(teacher_prompt_ids, rollouts)
        request: TeacherRequest = objective.teacher_request
        kw = dict(temperature=request.temperature, chunk_size=request.chunk_size, impl=request.impl)
        hidden_out, entropy_out, ids_out, lps_out = [], [], [], []
        with self.teacher.active() as model:
            vocab = causal_lm_of(model).get_output_embeddings().weight.shape[0]
            if request.kind == "topk" and request.k > vocab:
                raise ValueError(f"objective.topk.k must be at most the vocabulary size {vocab}, got {request.k}")
            for start in range(0, len(rollouts), self.forward_batch_size):
                chunk = rollouts[start:start + self.forward_batch_size]
                lengths = [len(r.completion_ids) for r in chunk]
                hidden = completion_hidden(model, prompts[start:start + len(chunk)],
                                           [r.completion_ids for r in chunk], self.pad_token_id)
                weight, bias = (t.detach() if t is not None else None for t in output_layer(model))
                token_lp, entropy = fused_linear_token_logprobs(hidden, weight, _flat_ids(chunk, self.device),
                                                                bias=bias, return_entropy=True, **kw)
                entropy_out.extend(entropy.float().split(lengths))
                if request.kind == "hidden":
                    hidden_out.extend(hidden.split(lengths))
                elif request.kind == "topk":
                    top_ids, top_lps = fused_linear_topk(hidden, weight, request.k, bias=bias, **kw)
                    ids_out.extend(top_ids.split(lengths))
                    lps_out.extend(top_lps.float().split(lengths))
                else:
                    lps_out.extend(token_lp.detach().float().split(lengths))
            if request.kind == "hidden" and self.parallel.sharded:
                weight, bias = (t.detach().clone() if t is not None else None for t in output_layer(model))
            self.parallel.release(model)
        entropy_out = tuple(entropy_out)
        if request.kind == "hidden":
            return FullVocabTargets(tuple(hidden_out), weight, bias, entropy_out)
        if request.kind == "topk":
            return TopKTargets(tuple(ids_out), tuple(lps_out), entropy_out)
        return SampledTargets(tuple(lps_out), entropy_out)

    def update_teacher(self, step: int) -> None:
        """After optimizer step `step` (1-based): EMA update, or sync when step % sync_every == 0."""
        self.teacher.update(step)

    # ------------------------------------------------------------------------------------- training
    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, objective: Objective) -> dict[str, float]:
        """One optimizer step of the objective over all rollouts, accumulated over micro-batches of
        optim.micro_batch_size rollouts (the token weights are decided over the whole batch, so the gradient
        equals that of one batch); then grad-norm clip, optimizer and schedule step.

        Metrics: those of `StepSums.metrics` and the objective's extra metrics, plus tokens_per_s (student
        prompt + completion tokens per second), step_time_s, optimizer_time_s (part of step_time_s), lr
        (used by this step), grad_norm (before clipping)."""
        rollouts = check_rollouts(rollouts)
        objective.check_targets(targets, rollouts)
        start_time = time.perf_counter()
        parallel = self.parallel
        local = [*objective.batch_totals(rollouts), sum(len(r.completion_ids) for r in rollouts)]
        n_total, counted_total, completion_total = parallel.sum(local)
        seq_weights = objective.sequence_weights(rollouts, (n_total, counted_total))
        self.model.train()
        sums, tokens_in = StepSums(), 0
        micro = self.optim_settings.micro_batch_size
        starts = range(0, len(rollouts), micro)
        for start in starts:
            idx = list(range(start, min(len(rollouts), start + micro)))
            chunk = [rollouts[i] for i in idx]
            lengths = [len(r.completion_ids) for r in chunk]
            if sum(lengths) == 0 and parallel.mode == "single":  # (DDP, FSDP2: every process runs every collective)
                continue
            tokens_in += sum(len(r.prompt_ids) + len(r.completion_ids) for r in chunk)
            with parallel.no_sync(self.model, skip=start != starts[-1]):
                hidden = completion_hidden(self.model, [r.prompt_ids for r in chunk],
                                           [r.completion_ids for r in chunk], self.pad_token_id)
                weight, bias = output_layer(self.model)
                seq = torch.repeat_interleave(torch.arange(len(chunk), device=self.device),
                                              torch.tensor(lengths, device=self.device))
                mask = torch.cat([objective.loss_mask(t, self.device) for t in lengths])
                weights = torch.tensor([seq_weights[i] for i in idx], dtype=torch.float32,
                                       device=self.device)[seq] * mask
                student = StudentTokens(
                    hidden=hidden, weight=weight, bias=bias, token_ids=_flat_ids(chunk, self.device),
                    sampler_logprobs=torch.tensor([x for r in chunk for x in r.sampler_logprobs],
                                                  dtype=torch.float32, device=self.device),
                    seq=seq, mask=mask, weights=weights, rollouts=idx)
                loss, chunk_sums = objective.local_loss(student, targets)
                if parallel.mode != "single" and not hidden.numel():
                    loss = loss + hidden.sum() * 0.0  # an empty micro-batch still takes part in the collectives
                (loss * parallel.loss_scale).backward()
            sums.add(chunk_sums)
        optimizer_start = time.perf_counter()
        grad_norm, lr = self._optimizer_step()
        optimizer_time = time.perf_counter() - optimizer_start
        elapsed = time.perf_counter() - start_time
        metrics = sums.summed(parallel.sum).metrics(rollouts=n_total, completion_tokens=completion_total,
                                                    counted=counted_total)
        metrics.update(objective.extra_metrics(targets))
        metrics.update(optimizer_time_s=optimizer_time, tokens_per_s=tokens_in / elapsed, step_time_s=elapsed,
                       lr=lr, grad_norm=grad_norm)
        if math.isnan(metrics["is_weight_mean"]):
            metrics["is_weight_mean"] = 1.0
        return metrics

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]) -> dict[str, float]:
        """One optimizer step of -sum_i sum_j log p(target_ij | prompt_i, target_i<j) / sum_i len(target_i)
        (cross-entropy, token mean over the whole batch - all processes - accumulated over micro-batches)."""
        prompts, targets = check_sft_batch(prompt_ids, target_ids)
        start_time = time.perf_counter()
        parallel = self.parallel
        (total,) = parallel.sum([sum(len(t) for t in targets)])
        self.model.train()
        loss_sum, tokens_in = 0.0, 0
        micro = self.optim_settings.micro_batch_size
        starts = range(0, len(prompts), micro)
        for start in starts:
            p_chunk, t_chunk = prompts[start:start + micro], targets[start:start + micro]
            tokens_in += sum(len(p) + len(t) for p, t in zip(p_chunk, t_chunk))
            with parallel.no_sync(self.model, skip=start != starts[-1]):
                hidden = completion_hidden(self.model, p_chunk, t_chunk, self.pad_token_id)
                weight, bias = output_layer(self.model)
                ids = torch.tensor([x for t in t_chunk for x in t], dtype=torch.long, device=self.device)
                loss = -fused_linear_token_logprobs(hidden, weight, ids, bias=bias).float().sum() / total
                (loss * parallel.loss_scale).backward()
            loss_sum += float(loss.detach())
        grad_norm, lr = self._optimizer_step()
        elapsed = time.perf_counter() - start_time
        (loss_sum,) = parallel.sum([loss_sum])
        return {"loss": loss_sum, "loss_tokens": float(total), "tokens_per_s": tokens_in / elapsed,
                "step_time_s": elapsed, "lr": lr, "grad_norm": grad_norm}

    def _optimizer_step(self) -> tuple[float, float]:
        """Clip the gradient norm (to optim.max_grad_norm when set), step optimizer and schedule, zero grads.
        Returns (the gradient norm before clipping, the lr used)."""
        params = list(self._trainable().values())
        if self.masters is not None:
            self.masters.grads_to_masters()
            params = self.masters.parameters()
        max_norm = self.optim_settings.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        if self.masters is not None:
            self.masters.masters_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.weights_changed()
        return grad_norm, lr

    # ---------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"student": trainable parameters by name (their fp32 masters when kept), "teacher": EMA/sync
        teacher weights (empty when static), "rng": {"sampler": the sampling generator state}}. Student and
        teacher entries are the live tensors, detached (under FSDP2: this process's shards, DTensors; a
        checkpoint loaded into them in place sets the state); copy them before training on if they must not
        change."""
        student = (self.masters.state_tensors() if self.masters is not None
                   else {name: p.detach() for name, p in self._trainable().items()})
        return {"student": student, "teacher": self.teacher.state_tensors(),
                "rng": {"sampler": self.sampler.generator.get_state()}}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for group in ("student", "teacher", "rng"):
            if group not in state:
                raise ValueError(f"state must have the groups student, teacher and rng; missing {group!r}")
        params = self._trainable()
        student = state["student"]
        check_state_tensors("state['student']", params, student)
        with torch.no_grad():
            if self.masters is not None:
                self.masters.load_state_tensors(student)
            else:
                for name, p in params.items():
                    copy_whole(p, student[name])
        self.teacher.load_state_tensors(state["teacher"])
        self.sampler.generator.set_state(state["rng"]["sampler"].cpu())
        self.sampler.weights_changed()

    def optimizer_state(self) -> dict:
        """{"optimizer": AdamW state_dict, "schedule": LambdaLR state_dict} (live tensors, not copies; under
        FSDP2 this process's shards of the optimizer state (DTensors), keyed by parameter name; a fresh
        optimizer's state is first made by a step with learning rate 0, which leaves the weights as they are)."""
        if self.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.model, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "schedule": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"optimizer", "schedule"}:
            raise ValueError(f"optimizer state must be a dict with keys optimizer and schedule, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        # deep copies: torch keeps tensors of a loaded optimizer state by reference when device and dtype match
        if self.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            moments = [v for entry in state["optimizer"].get("state", {}).values() for v in entry.values()]
            whole = not any(hasattr(v, "device_mesh") for v in moments)  # (a checkpoint of an unsharded run)
            set_optimizer_state_dict(self.model, self.optimizer, copy.deepcopy(state["optimizer"]),
                                     options=StateDictOptions(full_state_dict=whole))
        else:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(copy.deepcopy(state["schedule"]))


def _flat_ids(rollouts: Sequence[Rollout], device) -> torch.Tensor:
    return torch.tensor([x for r in rollouts for x in r.completion_ids], dtype=torch.long, device=device)
