"""The local backend: a Hugging Face causal LM (LoRA via peft, or full fine-tuning) on one device.

Sequences are built as [prompt | completion]. Position p of the input predicts token p + 1, so
completion token j of a rollout with a P-token prompt is predicted by the final-norm hidden state at
position P - 1 + j; the last completion token is never fed (nothing is predicted from it). Training and
teacher scoring use right padding (positions 0..len-1, padding masked out and never gathered); decoding
uses left padding with position ids counted over the real tokens only and a KV cache.

No [tokens, vocab] logits are materialized outside decoding: every loss and log-probability goes through
the fused losses of `sdft.losses` on the gathered hidden states and the output layer's weight.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
from torch import nn

from sdft.backends.base import (FullVocabTargets, LossSpec, Rollout, SampledTargets, SamplingParams,
                                Targets, TopKTargets, check_positive_int, check_rollouts, check_sft_batch,
                                check_token_lists, check_train_step, sequence_weights, topk_loss_from_logprobs)
from sdft.losses import (fused_linear_kl, fused_linear_token_logprobs, fused_linear_topk,
                         fused_linear_topk_distill_loss, sampled_token_loss)
from sdft.checkpoint import check_state_tensors
from sdft.optim import LOW_PRECISION, MasterWeights, build_optimizer, build_schedule
from sdft.teacher import TEACHER_MODES, build_teacher

STUDENT_MODES = ("lora", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LocalBackend:
    """SDFT on a local Hugging Face causal LM; implements `sdft.backends.base.Backend`.

    The backend takes ownership of `model`: it is cast to `dtype`, moved to `device` and, for
    `student_mode="lora"`, wrapped in place by peft (adapter B initialized to zero, so the student starts
    equal to the base model). Teacher modes are described in `sdft.teacher`.
    `forward_batch_size` bounds the sequences per teacher forward; `generation_batch_size` bounds the
    prompts per decoding batch (None: all at once). `grad_sync`, when given, is called with the trainable
    parameters after the last backward of a step and before clipping (a data-parallel gradient average).
    `master_weights`: under full fine-tuning of bf16/fp16 weights, the optimizer updates fp32 master copies
    (`sdft.optim.MasterWeights`) and the model gets their rounded values; False updates the low-precision
    weights in place (less memory, but updates smaller than half their rounding step are lost).
    """

    def __init__(self, model: nn.Module, tokenizer, *, student_mode: str = "lora", lora_rank: int = 16,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0,
                 lora_target_modules: str | Sequence[str] = "all-linear", teacher_mode: str = "static",
                 ema_alpha: float = 0.01, ema_fp32: bool = True, sync_every: int | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, schedule: str = "constant", total_steps: int = 1,
                 warmup_ratio: float = 0.0, max_grad_norm: float | None = 1.0,
                 gradient_checkpointing: bool = False, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, seed: int = 0,
                 forward_batch_size: int = 8, generation_batch_size: int | None = None,
                 eos_token_ids: Sequence[int] | None = None,
                 grad_sync: Callable[[list[nn.Parameter]], None] | None = None, master_weights: bool = True):
        if student_mode not in STUDENT_MODES:
            raise ValueError(f"student_mode must be one of {', '.join(STUDENT_MODES)}; got {student_mode!r}")
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}; got {teacher_mode!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a float > 0, got {max_grad_norm!r}")
        check_positive_int("forward_batch_size", forward_batch_size)
        if generation_batch_size is not None:
            check_positive_int("generation_batch_size", generation_batch_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _check_plain_output_head(model)

        self.tokenizer = tokenizer
        self.student_mode = student_mode
        self.max_grad_norm = max_grad_norm
        self.grad_sync = grad_sync
        self.forward_batch_size = forward_batch_size
        self.generation_batch_size = generation_batch_size
        self.eos_token_ids = _eos_ids(model, tokenizer, eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch dtype; got {dtype!r}")
            dtype = DTYPES[dtype]
        if dtype is not None:
            model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        self.device = next(model.parameters()).device

        if student_mode == "lora":
            model = _wrap_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                               target_modules=lora_target_modules, seed=seed)
        else:
            model.requires_grad_(True)
        self.model = model
        if gradient_checkpointing:
            self._causal_lm().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.teacher = build_teacher(model, mode=teacher_mode, ema_alpha=ema_alpha, sync_every=sync_every,
                                     ema_fp32=ema_fp32)
        trainable = self._trainable()
        low = student_mode == "full" and any(p.dtype in LOW_PRECISION for p in trainable.values())
        self.masters = MasterWeights(trainable) if master_weights and low else None
        self.optimizer = build_optimizer(self.masters.parameters() if self.masters else trainable.values(), lr=lr,
                                         weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps)
        self.scheduler = build_schedule(self.optimizer, schedule=schedule, total_steps=total_steps,
                                        warmup_ratio=warmup_ratio)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    # ----------------------------------------------------------------------------------------- model
    def _causal_lm(self) -> nn.Module:
        """The causal LM module (for a peft model, the base model with the adapter layers injected)."""
        return self.model.get_base_model() if self.student_mode == "lora" else self.model

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -------------------------------------------------------------------------------------- sampling
    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One completion per prompt from the student (adapter enabled, eval mode, no grad), sampled from
        softmax(z / T) restricted to the top_p nucleus; sampler_logprobs are the log-probabilities under
        that restricted, renormalized distribution. Reproducible from `seed` and the call order, or, with
        `seeds`, per prompt from its own generator seeded by seeds[i] (independent of batching)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = check_token_lists("prompt_ids", prompt_ids)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds must have one entry per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=self.device) for _ in seeds]
            for generator, seed in zip(generators, seeds):
                generator.manual_seed(int(seed))
        out = self._decode(prompts, params.max_new_tokens, params.temperature, params.top_p, greedy=False,
                           generators=generators)
        return [Rollout(tuple(p), tuple(ids), tuple(lps), finished) for p, (ids, lps, finished) in zip(prompts, out)]

    def generate_greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        batch_size: int | None = None) -> list[list[int]]:
        """Greedy completions from the student; EOS is included when produced. `batch_size` bounds the
        prompts per decoding batch (default: generation_batch_size)."""
        check_positive_int("max_new_tokens", max_new_tokens)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        prompts = check_token_lists("prompt_ids", prompt_ids)
        return [ids for ids, _, _ in self._decode(prompts, max_new_tokens, 1.0, 1.0, greedy=True,
                                                  batch_size=batch_size)]

    def _decode(self, prompts, max_new_tokens, temperature, top_p, greedy, generators=None, batch_size=None):
        """(ids, logprobs, finished) per prompt from the student; `generators`: one per prompt (per-prompt
        random streams), else the backend's shared generator."""
        return decode_in_batches(
            self._causal_lm(), prompts, batch_size=batch_size or self.generation_batch_size or max(1, len(prompts)),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
            pad_token_id=self.pad_token_id, eos_token_ids=self.eos_token_ids, generator=self.generator,
            generators=generators)

    # ------------------------------------------------------------------------------- hidden states
    def _completion_hidden(self, causal_lm, prompts, completions) -> torch.Tensor:
        """Final-norm hidden states [sum_i T_i, H] at the positions predicting each completion token.

        Inputs [prompt_i | completion_i[:-1]] are right-padded; row j of rollout i (in order) is the hidden
        state at position len(prompt_i) - 1 + j.
        """
        seqs = [list(p) + list(c[:-1]) for p, c in zip(prompts, completions)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long, device=self.device)
        attention = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        gather = []
        for b, (seq, prompt, completion) in enumerate(zip(seqs, prompts, completions)):
            input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[b, :len(seq)] = 1
            gather.append(b * width + len(prompt) - 1 + torch.arange(len(completion)))
        positions = torch.arange(width, device=self.device).expand(len(seqs), width)
        decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        hidden = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         use_cache=False).last_hidden_state
        index = torch.cat(gather).to(self.device)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)

    # --------------------------------------------------------------------------------------- teacher
    def teacher_targets(self, teacher_prompt_ids: Sequence[Sequence[int]], rollouts: Sequence[Rollout],
                        spec: LossSpec) -> Targets:
        """Run the teacher on [teacher prompt | completion] and return, per rollout, the targets that
        `spec.targets` asks for, plus the teacher's entropy at temperature spec.temperature per token."""
        if not isinstance(spec, LossSpec):
            raise ValueError(f"spec must be a LossSpec, got {type(spec).__name__}")
        prompts = check_token_lists("teacher_prompt_ids", teacher_prompt_ids)
        rollouts = check_rollouts(rollouts)
        if len(prompts) != len(rollouts):
            raise ValueError(f"teacher_prompt_ids must have one prompt per rollout: got {len(prompts)} "
                             f"prompts for {len(rollouts)} rollouts")
        kw = dict(temperature=spec.temperature, chunk_size=spec.chunk_size, impl=spec.impl)
        hidden_out, entropy_out, ids_out, lps_out = [], [], [], []
        with self.teacher.active() as causal_lm:
            weight, bias = _output_layer(causal_lm)
            weight = weight.detach()
            bias = None if bias is None else bias.detach()
            if spec.targets == "topk" and spec.topk > weight.shape[0]:
                raise ValueError(f"topk must be at most the vocabulary size {weight.shape[0]}, got {spec.topk}")
            for start in range(0, len(rollouts), self.forward_batch_size):
                chunk = rollouts[start:start + self.forward_batch_size]
                lengths = [len(r.completion_ids) for r in chunk]
                hidden = self._completion_hidden(causal_lm, prompts[start:start + len(chunk)],
                                                 [r.completion_ids for r in chunk])
                ids = _flat_ids(chunk, self.device)
                token_lp, entropy = fused_linear_token_logprobs(hidden, weight, ids, bias=bias,
                                                                return_entropy=True, **kw)
                entropy_out.extend(entropy.float().split(lengths))
                if spec.targets == "full":
                    hidden_out.extend(hidden.split(lengths))
                elif spec.targets == "topk":
                    top_ids, top_lps = fused_linear_topk(hidden, weight, spec.topk, bias=bias, **kw)
                    ids_out.extend(top_ids.split(lengths))
                    lps_out.extend(top_lps.float().split(lengths))
                else:
                    lps_out.extend(token_lp.detach().float().split(lengths))
        entropy_out = tuple(entropy_out)
        if spec.targets == "full":
            return FullVocabTargets(tuple(hidden_out), weight, bias, entropy_out)
        if spec.targets == "topk":
            return TopKTargets(tuple(ids_out), tuple(lps_out), entropy_out)
        return SampledTargets(tuple(lps_out), entropy_out)

    def update_teacher(self, step: int) -> None:
        """After optimizer step `step` (1-based): EMA update, or sync when step % sync_every == 0."""
        self.teacher.update(step)

    # ------------------------------------------------------------------------------------- training
    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, spec: LossSpec, *,
                   micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of the distillation loss over all rollouts.

        Token t of rollout i (T_i tokens, n rollouts) is in the loss iff t >= spec.skip_first_n_tokens;
        with L_i the count of such tokens, its weight is 1 / (L_i * n) for "seq_mean", 1 / sum_i L_i for
        "token_mean" and 1 for "sum", times the detached truncated importance weight of rollout i when
        spec.is_clip is set (not for "sampled" targets, whose loss clamps the per-token ratio itself).
        The objective sum_t w_t loss_t is accumulated over micro-batches of `micro_batch_size` rollouts,
        so the gradient equals that of one batch. Then: grad-norm clip, optimizer and schedule step.
        The fused losses are called with reduction="none" and the mask, and weighted here, so that the
        per-token values also give the metrics (under full fine-tuning this costs the loss one extra
        pass over the vocabulary for the output-layer gradient).

        Metrics: loss (the objective), kl (mean over loss tokens of the per-token term: the divergence,
        the top-K cross-entropy, or for "sampled" log p_student - log p_teacher of the sampled token),
        teacher_entropy / student_entropy (means over loss tokens), completion_len (mean), loss_tokens,
        tokens_per_s (student prompt + completion tokens per second), step_time_s, optimizer_time_s
        (clip + optimizer + schedule, part of step_time_s), lr (used by this
        step), grad_norm (before clipping), is_weight_mean (mean per-sequence truncated IS weight; a
        diagnostic of sampler/trainer mismatch, applied only when is_clip is set).
        """
        rollouts = check_train_step(rollouts, targets, spec, micro_batch_size)
        start_time = time.perf_counter()
        n = len(rollouts)
        counted, seq_weight = sequence_weights(rollouts, spec)
        total_counted = sum(counted)

        self.model.train()
        causal_lm = self._causal_lm()
        weight, bias = _output_layer(causal_lm)
        kw = dict(temperature=spec.temperature, chunk_size=spec.chunk_size, impl=spec.impl)
        sums = dict(loss=0.0, kl=0.0, teacher_entropy=0.0, student_entropy=0.0)
        is_weights, tokens_in = [], 0
        for start in range(0, n, micro_batch_size):
            idx = list(range(start, min(n, start + micro_batch_size)))
            chunk = [rollouts[i] for i in idx]
            lengths = [len(r.completion_ids) for r in chunk]
            if sum(lengths) == 0:
                continue
            tokens_in += sum(len(r.prompt_ids) + len(r.completion_ids) for r in chunk)
            hidden = self._completion_hidden(causal_lm, [r.prompt_ids for r in chunk],
                                             [r.completion_ids for r in chunk])
            ids = _flat_ids(chunk, self.device)
            seq = torch.repeat_interleave(torch.arange(len(chunk), device=self.device),
                                          torch.tensor(lengths, device=self.device))
            mask = torch.cat([torch.arange(t, device=self.device) >= spec.skip_first_n_tokens for t in lengths])
            sampler_lp = torch.tensor([x for r in chunk for x in r.sampler_logprobs], dtype=torch.float32,
                                      device=self.device)
            token_weight = torch.tensor([seq_weight[i] for i in idx], dtype=torch.float32,
                                        device=self.device)[seq]
            token_weight = token_weight * mask

            if spec.targets == "sampled":
                student_lp, student_entropy = fused_linear_token_logprobs(
                    hidden, weight, ids, bias=bias, return_entropy=True, **kw)
            else:
                with torch.no_grad():
                    student_lp, student_entropy = fused_linear_token_logprobs(
                        hidden.detach(), weight.detach(), ids, bias=None if bias is None else bias.detach(),
                        return_entropy=True, **kw)
            seq_is = _truncated_is_weight(student_lp.detach(), sampler_lp, mask, seq, len(chunk), spec.is_clip)
            is_weights.extend(seq_is.tolist())
            if spec.is_clip is not None and spec.targets != "sampled":
                token_weight = token_weight * seq_is[seq]

            if spec.targets == "full":
                teacher_hidden = torch.cat([targets.hidden[i] for i in idx]).to(self.device)
                per_token = fused_linear_kl(
                    hidden, weight, teacher_hidden, targets.weight.to(self.device), kind=spec.kind,
                    beta=spec.beta, mask=mask, reduction="none", student_bias=bias,
                    teacher_bias=None if targets.bias is None else targets.bias.to(self.device), **kw)
            elif spec.targets == "topk" and spec.topk_kind == "reverse_kl":
                per_token = _topk_reverse_kl(
                    hidden, weight, bias, torch.cat([targets.ids[i] for i in idx]).to(self.device),
                    torch.cat([targets.logprobs[i] for i in idx]).to(self.device), mask,
                    temperature=spec.temperature)
            elif spec.targets == "topk":
                per_token = fused_linear_topk_distill_loss(
                    hidden, weight, torch.cat([targets.ids[i] for i in idx]).to(self.device),
                    torch.cat([targets.logprobs[i] for i in idx]).to(self.device),
                    normalize=spec.topk_normalize, kind=spec.topk_kind, mask=mask, reduction="none",
                    student_bias=bias, **kw)
            else:
                teacher_lp = torch.cat([targets.teacher_logprobs[i] for i in idx]).to(self.device)
                per_token = sampled_token_loss(student_lp, teacher_lp, sampler_lp, clip=spec.is_clip, mask=mask,
                                               reduction="none")
            loss = (per_token.float() * token_weight).sum()
            loss.backward()

            with torch.no_grad():
                if spec.targets == "sampled":  # the sampled-token estimate of KL(student || teacher)
                    divergence = (student_lp.detach() - teacher_lp) * mask
                else:
                    divergence = per_token.detach().float() * mask
                sums["loss"] += float(loss.detach())
                sums["kl"] += float(divergence.sum())
                sums["student_entropy"] += float((student_entropy.float() * mask).sum())
                if targets.teacher_entropy is not None:
                    teacher_entropy = torch.cat([targets.teacher_entropy[i] for i in idx]).to(self.device)
                    sums["teacher_entropy"] += float((teacher_entropy.float() * mask).sum())

        optimizer_start = time.perf_counter()
        grad_norm, lr = self._optimizer_step()
        optimizer_time = time.perf_counter() - optimizer_start
        elapsed = time.perf_counter() - start_time
        denominator = max(total_counted, 1)
        return {
            "loss": sums["loss"],
            "kl": sums["kl"] / denominator,
            "teacher_entropy": (sums["teacher_entropy"] / denominator if targets.teacher_entropy is not None
                                else float("nan")),
            "student_entropy": sums["student_entropy"] / denominator,
            "completion_len": sum(len(r.completion_ids) for r in rollouts) / n,
            "loss_tokens": float(total_counted),
            "optimizer_time_s": optimizer_time,
            "tokens_per_s": tokens_in / elapsed,
            "step_time_s": elapsed,
            "lr": lr,
            "grad_norm": grad_norm,
            "is_weight_mean": sum(is_weights) / len(is_weights) if is_weights else 1.0,
        }

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], *,
                 micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of -sum_i sum_j log p(target_ij | prompt_i, target_i<j) / sum_i len(target_i)
        (cross-entropy, token mean over the whole batch, accumulated over micro-batches)."""
        prompts, targets = check_sft_batch(prompt_ids, target_ids, micro_batch_size)
        start_time = time.perf_counter()
        total = sum(len(t) for t in targets)
        self.model.train()
        causal_lm = self._causal_lm()
        weight, bias = _output_layer(causal_lm)
        loss_sum, tokens_in = 0.0, 0
        for start in range(0, len(prompts), micro_batch_size):
            p_chunk, t_chunk = prompts[start:start + micro_batch_size], targets[start:start + micro_batch_size]
            tokens_in += sum(len(p) + len(t) for p, t in zip(p_chunk, t_chunk))
            hidden = self._completion_hidden(causal_lm, p_chunk, t_chunk)
            ids = torch.tensor([x for t in t_chunk for x in t], dtype=torch.long, device=self.device)
            logprobs = fused_linear_token_logprobs(hidden, weight, ids, bias=bias)
            loss = -logprobs.float().sum() / total
            loss.backward()
            loss_sum += float(loss.detach())
        grad_norm, lr = self._optimizer_step()
        elapsed = time.perf_counter() - start_time
        return {"loss": loss_sum, "loss_tokens": float(total), "tokens_per_s": tokens_in / elapsed,
                "step_time_s": elapsed, "lr": lr, "grad_norm": grad_norm}

    def _optimizer_step(self) -> tuple[float, float]:
        """Clip the gradient norm (to max_grad_norm when set), step optimizer and schedule, zero grads.
        Returns (the gradient norm before clipping, the lr used)."""
        params = list(self._trainable().values())
        if self.grad_sync is not None:
            self.grad_sync(params)
        if self.masters is not None:
            self.masters.grads_to_masters()
            params = self.masters.parameters()
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        if self.masters is not None:
            self.masters.masters_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    # ---------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"student": trainable parameters by name (their fp32 masters when kept), "teacher": EMA/sync
        teacher weights (empty when static), "rng": {"sampler": the sampling generator state}}. Student and
        teacher entries are the live tensors, detached; copy them before training on if they must not change."""
        student = (self.masters.state_tensors() if self.masters is not None
                   else {name: p.detach() for name, p in self._trainable().items()})
        return {
            "student": student,
            "teacher": self.teacher.state_tensors(),
            "rng": {"sampler": self.generator.get_state()},
        }

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
                    p.copy_(student[name])
        self.teacher.load_state_tensors(state["teacher"])
        self.generator.set_state(state["rng"]["sampler"].cpu())

    def optimizer_state(self) -> dict:
        """{"optimizer": AdamW state_dict, "schedule": LambdaLR state_dict} (live tensors, not copies)."""
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"optimizer", "schedule"}:
            raise ValueError(f"optimizer state must be a dict with keys optimizer and schedule, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        # deep copies: torch keeps tensors of a loaded optimizer state by reference when device and dtype match
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(copy.deepcopy(state["schedule"]))


# ------------------------------------------------------------------------------------------- helpers
def greedy_generate_fn(causal_lm: nn.Module, tokenizer, *, batch_size: int = 8,
                       eos_token_ids: Sequence[int] | None = None):
    """A `sdft.evaluation.GenerateFn` for a plain causal LM: greedy `decode_in_batches`, stopping at the
    model's or tokenizer's EOS; the same decoding as `LocalBackend.generate_greedy` without a backend."""
    check_positive_int("batch_size", batch_size)
    eos = _eos_ids(causal_lm, tokenizer, eos_token_ids)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])

    def generate(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        check_positive_int("max_new_tokens", max_new_tokens)
        prompts = check_token_lists("prompt_ids", prompt_ids)
        return [ids for ids, _, _ in decode_in_batches(causal_lm, prompts, batch_size=batch_size,
                                                      max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                                                      greedy=True, pad_token_id=pad, eos_token_ids=eos)]
    return generate


def decode_in_batches(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], *, batch_size: int,
                      generators: Sequence[torch.Generator] | None = None,
                      **options) -> list[tuple[list[int], list[float], bool]]:
    """`decode_batch` over `batch_size` prompts at a time (prompt b with generators[b] when given), in eval
    mode under torch.no_grad(); the module's training mode is restored afterwards."""
    results = []
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                results.extend(decode_batch(causal_lm, prompts[start:start + batch_size], **options,
                                            generators=None if generators is None else
                                            generators[start:start + batch_size]))
    finally:
        causal_lm.train(was_training)
    return results


def decode_batch(causal_lm: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool, pad_token_id: int, eos_token_ids: Sequence[int],
                 generator: torch.Generator | None = None,
                 generators: Sequence[torch.Generator] | None = None) -> list[tuple[list[int], list[float], bool]]:
    """Left-padded KV-cache decoding of one batch of prompts with `causal_lm` (call under torch.no_grad(),
    in eval mode); returns (completion ids, sampler log-probs, finished) per prompt.

    greedy: argmax, log-probs of softmax(z); otherwise a draw from softmax(z / temperature) restricted to
    the top_p nucleus, log-probs under that distribution. `generators` gives prompt b its own random
    stream (results then do not depend on batching), else `generator` is shared. A prompt is finished
    when it produced one of `eos_token_ids` (included in its ids); positions after that are dropped.
    """
    device = next(causal_lm.parameters()).device
    pad, eos_ids = int(pad_token_id), [int(i) for i in eos_token_ids]
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[b, width - len(prompt):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    out = causal_lm(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, alive = [], [], []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            token = logits.argmax(-1)
            token_lp = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
        else:
            lp = _sampling_logprobs(logits, temperature, top_p)
            probs = lp.exp()
            if generators is None:
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
            token_lp = lp.gather(-1, token[:, None])[:, 0]
        alive.append(~done)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens.append(token)
        logprobs.append(token_lp)
        done = done | torch.isin(token, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = causal_lm(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                        past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    tokens = torch.stack(tokens, 1).tolist()
    logprobs = torch.stack(logprobs, 1).tolist()
    alive = torch.stack(alive, 1).tolist()
    finished = done.tolist()
    results = []
    for b in range(batch):
        n = sum(alive[b])
        results.append((tokens[b][:n], [float(x) for x in logprobs[b][:n]], bool(finished[b])))
    return results


def _sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log-softmax(z / T) [B, V] restricted to the smallest set of most likely tokens whose probability
    reaches top_p (the rest get -inf), renormalized."""
    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, -1)


def _topk_reverse_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, topk_ids: torch.Tensor,
                     topk_logprobs: torch.Tensor, mask: torch.Tensor, *, temperature: float,
                     chunk_rows: int = 1024) -> torch.Tensor:
    """Reverse KL between the renormalized top-K distributions (`topk_loss_from_logprobs`, kind reverse_kl)
    from hidden [N, H] and the output layer [V, H]: only the student logits at the K ids are needed
    (z_k = h . W[id_k] + b[id_k], over temperature), since the renormalization cancels the log-partition.
    Rows are processed `chunk_rows` at a time ([chunk, K, H] gathered weights); masked rows give 0. [N]."""
    v = weight.shape[0]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        ids = topk_ids[rows]
        safe = torch.where((ids >= 0) & (ids < v), ids, torch.zeros_like(ids)).long()
        logits = torch.einsum("nh,nkh->nk", hidden[rows].to(dtype), weight[safe].to(dtype))
        if bias is not None:
            logits = logits + bias[safe].to(dtype)
        per_token = topk_loss_from_logprobs(logits / temperature, ids, topk_logprobs[rows], vocab_size=v,
                                            normalize="renormalize", kind="reverse_kl")
        out.append(torch.where(mask[rows], per_token, torch.zeros_like(per_token)))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=dtype)


def _truncated_is_weight(train_lp, sampler_lp, mask, seq, n_seq, clip) -> torch.Tensor:
    """Per sequence: mean over unmasked tokens of min(exp(train_lp - sampler_lp), clip) [n_seq]
    (no clamp when clip is None; 1 for a sequence without unmasked tokens)."""
    ratio = torch.exp(train_lp.float() - sampler_lp.float())
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    maskf = mask.float()
    total = torch.zeros(n_seq, device=ratio.device).index_add_(0, seq, ratio * maskf)
    count = torch.zeros(n_seq, device=ratio.device).index_add_(0, seq, maskf)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def _output_layer(causal_lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output layer must be a plain nn.Linear, got {type(head).__name__}")
    return head.weight, head.bias


def _check_plain_output_head(model: nn.Module) -> None:
    """Logits must be exactly hidden @ W.T + b: reject soft-capped or scaled output heads."""
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap is not None or scale not in (None, 1, 1.0):
        raise ValueError(f"model output heads with final_logit_softcapping={softcap!r} or logit_scale={scale!r} "
                         "are not supported; logits must be hidden @ W.T + b")
    _output_layer(model)


def _wrap_lora(model, *, rank, alpha, dropout, target_modules, seed):
    from peft import LoraConfig, get_peft_model

    check_positive_int("lora_rank", rank)
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"lora_alpha must be a float > 0, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
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
        return get_peft_model(model, config)


def _eos_ids(model, tokenizer, eos_token_ids) -> list[int]:
    if eos_token_ids is not None:
        ids = [int(i) for i in eos_token_ids]
        if not ids:
            raise ValueError("eos_token_ids must hold at least one id, got an empty list")
        return ids
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("no EOS token: the tokenizer and generation config define none; pass eos_token_ids")
    return ids


def _flat_ids(rollouts: Sequence[Rollout], device) -> torch.Tensor:
    return torch.tensor([x for r in rollouts for x in r.completion_ids], dtype=torch.long, device=device)


