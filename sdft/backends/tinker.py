"""The Tinker backend: the same SDFT loop on the Tinker API (`pip install 'sdft[tinker]'`, SDK 0.38).

The student is a LoRA `TrainingClient`; the teacher is a `SamplingClient`; the loop in `sdft.loop` runs
unchanged. Every call goes through a service client that is either injected (`service_client=`, e.g. the
in-process `sdft.backends.tinker_offline.OfflineServiceClient` for offline debugging and tests) or built
as `tinker.ServiceClient()`, which needs TINKER_API_KEY (checked before any network call).

How the Backend protocol maps onto Tinker (a rollout's sequence is S = prompt + completion, P prompt and
T completion tokens; a datum's model_input is S[:-1], so row r predicts S[r + 1] and completion token j
is predicted by row P - 1 + j):
  sample           one `SamplingClient.sample` request per prompt, all in flight at once, on a snapshot of
                   the current student weights (`save_weights_for_sampler` after each optimizer step, taken
                   when first needed), SamplingParams(max_tokens, temperature, top_p, seed=seeds[i],
                   stop=EOS ids); finished = stop_reason "stop"; sampler log-probs = sequence.logprobs.
  teacher          teacher.mode=static: the base model's sampling client; sync: the student's snapshot after
                   every sync_every-th step (ema is impossible: Tinker cannot average weights).
  teacher_targets  topk: one request per rollout sampling 1 token from S with include_prompt_logprobs=True,
                   topk_prompt_logprobs=K, prompt_logprobs_last_n=T; entry P + j of topk_prompt_logprobs is
                   the teacher's top-K for completion token j. sampled: compute_logprobs(S), entry P + j.
  train_step       one forward_backward over all rollouts, then optim_step(AdamParams(lr, beta1, beta2, eps,
                   weight_decay, grad_clip_norm)) submitted before waiting:
                   - topk, renormalize, cross_entropy or forward_kl, is_clip null: built-in "cross_entropy"
                     with target_tokens and weights [S - 1, K]: rows of completion tokens hold the teacher's
                     ids and w_t * q_tk (q = teacher top-K renormalized over the valid ids), every other
                     row 0. Loss = -sum w_t q_tk log p_s(id_tk), log p_s the student's full-vocabulary
                     log-softmax (forward_kl differs by the constant sum w_t q log q, added to the metric).
                   - sampled, is_clip null: built-in "importance_sampling" with advantages
                     w_t (log p_teacher - log p_sampler) and logprobs = the sampler's.
                   - otherwise (topk_normalize=tail, topk_kind=reverse_kl, or is_clip set):
                     forward_backward_custom on the log-probs of target_tokens [S - 1, K + 1] (the K
                     teacher ids and, last, the sampled token), with the per-token loss of
                     `sdft.backends.base.topk_loss_from_logprobs` and the truncated importance weight of
                     the local backend; for sampled targets the ratio clamp. Costs Tinker one extra forward.
  sft_step         built-in "cross_entropy" with weight 1 / (target tokens in the batch) on target rows.
  checkpoints      `save_state` (weights + Adam state) path, teacher snapshot path and step count go into the
                   run's checkpoint (optimizer_state); resume builds the training client with
                   `create_training_client_from_state_with_optimizer`.

Reductions: Tinker sums its loss over datum rows. Token t of rollout i gets the local backend's weight
w_t (seq_mean: 1 / (L_i n), token_mean: 1 / sum_i L_i, sum: 1, with L_i the loss tokens of rollout i and
the first skip_first_n_tokens tokens at 0) inside the datum weights or advantages, so every reduction
optimizes the same objective as locally. The cookbook uses the plain sum (reduction=sum): its loss and
effective step size grow with completion length and batch size.

Teacher responses are checked, never guessed: a response whose top-K list has not exactly one entry per
token of S, or no entry at a completion position, or more than K pairs there, is an error. Within a row,
padding pairs (log-prob <= -99999 or not finite), ids outside [0, vocab_size) and repeated ids are dropped
and a shorter list is padded; dropped slots are invalid (id -1) and the rest is renormalized by the loss.
The fraction of invalid slots is reported as train/teacher_topk_invalid_frac.

Transient errors (connection, timeout, rate limit, server errors) of idempotent requests (sampling,
teacher scoring, snapshots, checkpoints, client creation) are retried `max_retries` times with exponential
backoff; forward_backward and optim_step are not retried (a repeated forward_backward could add its
gradient twice). `micro_batch_size` is accepted and unused: Tinker batches the datums itself.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sdft.backends.base import (LossSpec, Rollout, SampledTargets, SamplingParams, Targets, TopKTargets,
                                check_positive_int, check_rollouts, check_sft_batch,
                                check_token_lists, check_train_step, sequence_weights, topk_loss_from_logprobs)
from sdft.losses.reference import topk_teacher_weights
from sdft.optim import SCHEDULES, lr_factor

try:  # the SDK is an optional dependency: `pip install sdft[tinker]`
    import tinker
    from tinker import types
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Tinker backend needs the Tinker SDK: pip install 'sdft[tinker]' "
                      "(or pip install tinker)") from error

__all__ = ["TinkerBackend", "require_api_key", "TEACHER_MODES", "API_KEY_VARIABLE", "topk_rows_from_response"]

TEACHER_MODES = ("static", "sync")
API_KEY_VARIABLE = "TINKER_API_KEY"
PADDING_LOGPROB = -99999.0
"""The SDK fills missing top-K pairs with (token 0, log-prob -99999); such pairs are never teacher mass."""

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, tinker.APIConnectionError, tinker.RateLimitError, tinker.InternalServerError)


def require_api_key() -> str:
    """The value of TINKER_API_KEY; a clear error when it is missing (checked before any network call)."""
    key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not key:
        raise ValueError(f"{API_KEY_VARIABLE} is not set: the Tinker backend (backend.kind=tinker, "
                         f"backend.tinker_service=remote) needs an API key; export {API_KEY_VARIABLE}=<your key>, "
                         "or debug offline with backend.tinker_service=offline")
    return key


@dataclass
class _RolloutRows:
    """Where rollout i's completion sits in its datum and what its loss needs (T = completion length)."""

    index: int
    first: int                      # datum row predicting completion token 0 (= P - 1)
    weight: torch.Tensor            # [T] float64 w_t, 0 on skipped tokens
    mask: torch.Tensor              # [T] bool, token counts in the loss
    sampler: torch.Tensor           # [T] float64 sampler log-probs
    ids: torch.Tensor | None = None         # [T, K] teacher top-K ids (-1 invalid)
    teacher: torch.Tensor | None = None     # [T, K] teacher top-K log-probs, or [T] sampled-token log-probs


class TinkerBackend:
    """SDFT on the Tinker API; implements `sdft.backends.base.Backend` (see the module docstring).

    `base_model` must be served by the service (checked at construction). `tokenizer` gives the EOS ids
    and the vocabulary size (len(tokenizer)) unless `eos_token_ids` / `vocab_size` are given. The LoRA
    adapter (rank, seed, which layers) is created on first use; lr follows `schedule` over `total_steps`
    exactly as on the local backend (`sdft.optim.lr_factor`). `sleep` is the backoff's sleep function.
    """

    def __init__(self, base_model: str, tokenizer=None, *, service_client=None, rest_client=None,
                 lora_rank: int = 32, seed: int = 0, train_mlp: bool = True, train_attn: bool = True,
                 train_unembed: bool = True, teacher_mode: str = "static", sync_every: int | None = None,
                 lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None, schedule: str = "constant",
                 total_steps: int = 1, warmup_ratio: float = 0.0, eos_token_ids: Sequence[int] | None = None,
                 vocab_size: int | None = None, max_retries: int = 5, retry_backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, checkpoint_prefix: str = "sdft"):
        if teacher_mode == "ema":
            raise ValueError("teacher_mode='ema' is impossible on Tinker: the teacher can only be the base model "
                             "or a saved copy of the student; allowed: 'static', 'sync'")
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}; got {teacher_mode!r}")
        if teacher_mode == "sync" and (not isinstance(sync_every, int) or isinstance(sync_every, bool)
                                       or sync_every < 1):
            raise ValueError(f"sync_every must be an int >= 1 for teacher_mode='sync', got {sync_every!r}")
        if not isinstance(base_model, str) or not base_model.strip():
            raise ValueError(f"base_model must name a Tinker base model, got {base_model!r}")
        for name, value in (("lora_rank", lora_rank), ("total_steps", total_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a float > 0, got {max_grad_norm!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not (isinstance(retry_backoff_s, (int, float)) and retry_backoff_s >= 0):
            raise ValueError(f"retry_backoff_s must be a float >= 0, got {retry_backoff_s!r}")

        self.base_model = base_model
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(tokenizer, eos_token_ids)
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("pass a tokenizer or vocab_size (ids at or above it are dropped from teacher top-K)")
            vocab_size = len(tokenizer)
        self.vocab_size = int(vocab_size)
        self.lora_rank, self.seed = lora_rank, int(seed)
        self.train_layers = dict(train_mlp=bool(train_mlp), train_attn=bool(train_attn),
                                 train_unembed=bool(train_unembed))
        self.teacher_mode, self.sync_every = teacher_mode, sync_every
        self.base_lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = max_grad_norm
        self.schedule, self.total_steps, self.warmup_ratio = schedule, total_steps, warmup_ratio
        lr_factor(0, schedule=schedule, total_steps=total_steps, warmup_ratio=warmup_ratio)  # validates
        self.max_retries, self.retry_backoff_s, self._sleep = max_retries, float(retry_backoff_s), sleep
        self.checkpoint_prefix = checkpoint_prefix

        if service_client is None:
            require_api_key()
            service_client = tinker.ServiceClient()
            rest_client = rest_client if rest_client is not None else tinker.RestClient()
        self.service = service_client
        self._check_base_model(rest_client)

        self._training = None          # the TrainingClient, created on first use
        self._student = None           # SamplingClient on the current student weights (None: stale)
        self._student_path: str | None = None
        self._teacher = None
        self._teacher_path: str | None = None  # None: the base model
        self._steps = 0                # optimizer steps done
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)

    # --------------------------------------------------------------------------------- clients
    def _check_base_model(self, rest_client) -> None:
        if rest_client is None and hasattr(self.service, "create_rest_client"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                rest_client = self.service.create_rest_client()
        if rest_client is None:
            return
        capabilities = self._call(lambda attempt: rest_client.get_server_capabilities(), "get_server_capabilities")
        served = [m.model_name for m in capabilities.supported_models if m.model_name]
        if self.base_model not in served:
            raise ValueError(f"backend.tinker_base_model={self.base_model!r} is not served by this Tinker service; "
                             f"available: {', '.join(served) or '(none)'}")

    def _training_client(self):
        if self._training is None:
            self._training = self._call(lambda attempt: self.service.create_lora_training_client(
                self.base_model, rank=self.lora_rank, seed=self.seed, **self.train_layers),
                "create_lora_training_client")
        return self._training

    def _student_sampler(self):
        """A sampling client on the current student weights (one snapshot per optimizer step)."""
        if self._student is None:
            training = self._training_client()
            name = f"{self.checkpoint_prefix}-sampler-{self._steps:06d}"
            path = self._call(lambda attempt: training.save_weights_for_sampler(_retry_name(name, attempt)),
                              "save_weights_for_sampler").path
            self._student = self._call(lambda attempt: training.create_sampling_client(path), "create_sampling_client")
            self._student_path = path
        return self._student

    def _teacher_sampler(self):
        if self._teacher is None:
            if self._teacher_path is None:
                self._teacher = self._call(lambda attempt: self.service.create_sampling_client(
                    base_model=self.base_model), "create_sampling_client (teacher)")
            else:
                path = self._teacher_path
                self._teacher = self._call(lambda attempt: self.service.create_sampling_client(model_path=path),
                                           "create_sampling_client (teacher)")
        return self._teacher

    # ---------------------------------------------------------------------------------- retries
    def _call(self, submit: Callable[[int], Any], what: str):
        """submit(attempt) -> a future (or a value); its result, retrying transient errors with backoff."""
        return self._gather([submit], what)[0]

    def _gather(self, submits: Sequence[Callable[[int], Any]], what: str) -> list:
        """Submit every request first (all in flight), then collect the results in order; a request that
        fails with a transient error is resubmitted up to max_retries times, waiting
        retry_backoff_s * 2**attempt before each retry."""
        pending = [_submit(submit, 0) for submit in submits]
        results = []
        for index, (submit, future) in enumerate(zip(submits, pending)):
            attempt = 0
            while True:
                try:
                    results.append(_resolve(future))
                    break
                except TRANSIENT_ERRORS as error:
                    if attempt >= self.max_retries:
                        label = what if len(submits) == 1 else f"{what} (request {index})"
                        raise RuntimeError(f"Tinker request {label} failed after {attempt + 1} attempts with a "
                                           f"transient error: {type(error).__name__}: {error}") from error
                    self._sleep(self.retry_backoff_s * 2 ** attempt)
                    attempt += 1
                    future = _submit(submit, attempt)
        return results

    # ------------------------------------------------------------------------------------ lr
    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (the local backend's schedule)."""
        return self.base_lr * lr_factor(self._steps, schedule=self.schedule, total_steps=self.total_steps,
                                        warmup_ratio=self.warmup_ratio)

    def _adam_params(self, lr: float) -> types.AdamParams:
        return types.AdamParams(learning_rate=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                weight_decay=self.weight_decay, grad_clip_norm=float(self.max_grad_norm or 0.0))

    # ------------------------------------------------------------------------------------ sampling
    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One completion per prompt from the current student weights; with `seeds`, prompt i is sampled
        with SamplingParams.seed = seeds[i], else with seeds drawn from this backend's generator."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = check_token_lists("prompt_ids", prompt_ids)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds must have one entry per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(prompts),), generator=self.generator).tolist()
        sampler = self._student_sampler()
        submits = [_sample_request(sampler, prompt, types.SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=int(seed),
            stop=list(self.eos_token_ids))) for prompt, seed in zip(prompts, seeds)]
        rollouts = []
        for i, (prompt, response) in enumerate(zip(prompts, self._gather(submits, "sample"))):
            ids, logprobs, finished = _first_sequence(response, f"sample response {i}")
            rollouts.append(Rollout(tuple(prompt), tuple(ids), tuple(logprobs), finished))
        return rollouts

    def generate_greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        batch_size: int | None = None) -> list[list[int]]:
        """Greedy completions of the current student (top_k=1), EOS included when produced; at most
        `batch_size` requests in flight (None: all)."""
        check_positive_int("max_new_tokens", max_new_tokens)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        prompts = check_token_lists("prompt_ids", prompt_ids)
        sampler = self._student_sampler()
        params = types.SamplingParams(max_tokens=max_new_tokens, temperature=1.0, top_k=1, seed=0,
                                      stop=list(self.eos_token_ids))
        step = batch_size or len(prompts)
        out = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            responses = self._gather([_sample_request(sampler, p, params) for p in chunk], "sample (greedy)")
            out.extend(list(_first_sequence(r, f"greedy response {start + i}")[0]) for i, r in enumerate(responses))
        return out

    # ------------------------------------------------------------------------------------- teacher
    def teacher_targets(self, teacher_prompt_ids: Sequence[Sequence[int]], rollouts: Sequence[Rollout],
                        spec: LossSpec) -> Targets:
        """Score every rollout's completion with the teacher on [teacher prompt | completion], all requests
        in flight at once: TopKTargets (ids [T_i, K] with -1 for invalid slots, log-probs [T_i, K]) or
        SampledTargets. Teacher entropies are not available on Tinker (None)."""
        self._check_spec(spec)
        prompts = check_token_lists("teacher_prompt_ids", teacher_prompt_ids)
        rollouts = check_rollouts(rollouts)
        if len(prompts) != len(rollouts):
            raise ValueError(f"teacher_prompt_ids must have one prompt per rollout: got {len(prompts)} prompts for "
                             f"{len(rollouts)} rollouts")
        teacher = self._teacher_sampler()
        scored = [i for i, r in enumerate(rollouts) if r.completion_ids]
        sequences = {i: list(prompts[i]) + list(rollouts[i].completion_ids) for i in scored}
        if spec.targets == "topk":
            submits = [_topk_request(teacher, sequences[i], len(rollouts[i].completion_ids), spec.topk) for i in scored]
        else:
            submits = [_logprob_request(teacher, sequences[i], len(rollouts[i].completion_ids)) for i in scored]
        responses = dict(zip(scored, self._gather(submits, "teacher scoring")))
        if spec.targets == "topk":
            ids_out, lps_out = [], []
            for i, rollout in enumerate(rollouts):
                if i not in responses:
                    ids_out.append(torch.full((0, spec.topk), -1, dtype=torch.long))
                    lps_out.append(torch.zeros((0, spec.topk), dtype=torch.float32))
                    continue
                ids, lps, _ = topk_rows_from_response(
                    responses[i].topk_prompt_logprobs, prompt_len=len(prompts[i]),
                    completion_len=len(rollout.completion_ids), k=spec.topk, vocab_size=self.vocab_size,
                    where=f"teacher response for rollout {i}")
                ids_out.append(ids)
                lps_out.append(lps)
            return TopKTargets(tuple(ids_out), tuple(lps_out), None)
        lps_out = []
        for i, rollout in enumerate(rollouts):
            if i not in responses:
                lps_out.append(torch.zeros(0, dtype=torch.float32))
                continue
            lps_out.append(_sampled_rows(responses[i], len(prompts[i]), len(rollout.completion_ids),
                                         f"teacher response for rollout {i}"))
        return SampledTargets(tuple(lps_out), None)

    def update_teacher(self, step: int) -> None:
        """sync: after every sync_every-th optimizer step the teacher becomes the snapshot of the student
        taken for the next sampling (no extra save); static: nothing."""
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (optimizer steps done), got {step!r}")
        if self.teacher_mode == "sync" and step % self.sync_every == 0:
            self._teacher = self._student_sampler()
            self._teacher_path = self._student_path

    # ------------------------------------------------------------------------------------ training
    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, spec: LossSpec, *,
                   micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of the distillation loss over all rollouts (see the module docstring for the
        datums); the objective and the metrics are those of `LocalBackend.train_step`. Entropies and, on
        the built-in cross_entropy path, the importance weight are not available on Tinker (NaN)."""
        rollouts = check_train_step(rollouts, targets, spec, micro_batch_size)
        self._check_spec(spec)
        start_time = time.perf_counter()
        n = len(rollouts)
        counted, seq_weight = sequence_weights(rollouts, spec)
        total_counted = sum(counted)
        builtin = spec.is_clip is None and (
            spec.targets == "sampled" or (spec.topk_normalize == "renormalize" and spec.topk_kind != "reverse_kl"))

        datums, rows = [], []
        for i, rollout in enumerate(rollouts):
            if not rollout.completion_ids:
                continue
            datum, row = self._datum(i, rollout, targets, spec, seq_weight[i], builtin)
            datums.append(datum)
            rows.append(row)
        training = self._training_client()
        lr = self.lr
        captured: dict[str, list] = {}
        forward = None
        if datums:
            if builtin:
                forward = training.forward_backward(datums, "cross_entropy" if spec.targets == "topk"
                                                    else "importance_sampling")
            else:
                forward = training.forward_backward_custom(datums, self._custom_loss(rows, spec, captured))
        optimizer_start = time.perf_counter()
        optim = training.optim_step(self._adam_params(lr))
        output = _resolve(forward) if forward is not None else None
        optim_result = _resolve(optim)
        optimizer_time = time.perf_counter() - optimizer_start
        self._steps += 1
        self._student = None

        loss, divergence, is_weights = self._step_values(output, rows, spec, builtin, captured)
        elapsed = time.perf_counter() - start_time
        invalid = sum(int((t < 0).sum()) for t in targets.ids) if spec.targets == "topk" else 0
        slots = sum(t.numel() for t in targets.ids) if spec.targets == "topk" else 0
        grad_norm = float((optim_result.metrics or {}).get("grad_norm", math.nan)) if optim_result is not None else math.nan
        denominator = max(total_counted, 1)
        return {
            "loss": loss,
            "kl": divergence / denominator,
            "teacher_entropy": math.nan,
            "student_entropy": math.nan,
            "completion_len": sum(len(r.completion_ids) for r in rollouts) / n,
            "loss_tokens": float(total_counted),
            "optimizer_time_s": optimizer_time,
            "tokens_per_s": sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts) / elapsed,
            "step_time_s": elapsed,
            "lr": lr,
            "grad_norm": grad_norm,
            "is_weight_mean": sum(is_weights) / len(is_weights) if is_weights else math.nan,
            "teacher_topk_invalid_frac": invalid / slots if slots else 0.0,
        }

    def _datum(self, index: int, rollout: Rollout, targets: Targets, spec: LossSpec, seq_weight: float,
               builtin: bool) -> tuple[types.Datum, _RolloutRows]:
        prompt, completion = list(rollout.prompt_ids), list(rollout.completion_ids)
        sequence = prompt + completion
        length, first, count = len(sequence) - 1, len(prompt) - 1, len(completion)
        mask = torch.arange(count) >= spec.skip_first_n_tokens
        weight = torch.where(mask, torch.full((count,), seq_weight, dtype=torch.float64),
                             torch.zeros(count, dtype=torch.float64))
        sampler = torch.tensor(rollout.sampler_logprobs, dtype=torch.float64)
        row = _RolloutRows(index, first, weight, mask, sampler)
        rows = slice(first, first + count)
        next_tokens = torch.tensor(sequence[1:], dtype=torch.long)
        model_input = types.ModelInput.from_ints(sequence[:-1])
        if spec.targets == "sampled":
            row.teacher = targets.teacher_logprobs[index].to(torch.float64)
            if not builtin:
                return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": next_tokens}), row
            logprobs = torch.zeros(length, dtype=torch.float32)
            advantages = torch.zeros(length, dtype=torch.float32)
            logprobs[rows] = sampler.float()
            advantages[rows] = (weight * (row.teacher - sampler)).float()
            return types.Datum(model_input=model_input, loss_fn_inputs={
                "target_tokens": next_tokens, "logprobs": logprobs, "advantages": advantages}), row
        ids, teacher_lp = targets.ids[index].long(), targets.logprobs[index]
        row.ids, row.teacher = ids, teacher_lp
        k = ids.shape[1]
        valid = (ids >= 0) & (ids < self.vocab_size)
        safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
        if not builtin:
            target_tokens = torch.zeros((length, k + 1), dtype=torch.long)
            target_tokens[rows, :k] = safe_ids
            target_tokens[:, k] = next_tokens
            return types.Datum(model_input=model_input, loss_fn_inputs={
                "target_tokens": types.TensorData.from_torch(target_tokens)}), row
        _, q, _ = topk_teacher_weights(ids, teacher_lp, self.vocab_size, "renormalize")
        target_tokens = torch.zeros((length, k), dtype=torch.long)
        weights = torch.zeros((length, k), dtype=torch.float32)
        target_tokens[rows] = safe_ids
        weights[rows] = (weight[:, None] * q.to(torch.float64)).float()
        return types.Datum(model_input=model_input, loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch_sparse(target_tokens),
            "weights": types.TensorData.from_torch_sparse(weights)}), row

    def _custom_loss(self, rows: list[_RolloutRows], spec: LossSpec, captured: dict):
        """The loss of forward_backward_custom: sum_i sum_t w_t (IS weight) per_token_t over the rollouts."""
        vocab, clip = self.vocab_size, spec.is_clip

        def loss_fn(data, logprobs):
            total, per_tokens, is_weights = None, [], []
            for row, lp in zip(rows, logprobs):
                count = row.weight.shape[0]
                block = lp[row.first:row.first + count]
                dtype, device = block.dtype, block.device
                weight, sampler = row.weight.to(device, dtype), row.sampler.to(device, dtype)
                mask = row.mask.to(device)
                if spec.targets == "topk":
                    k = row.ids.shape[1]
                    per_token = topk_loss_from_logprobs(block[:, :k], row.ids.to(device), row.teacher.to(device),
                                                        vocab_size=vocab, normalize=spec.topk_normalize,
                                                        kind=spec.topk_kind)
                    seq_is = _truncated_is_weight(block[:, k].detach(), sampler, mask, clip)
                    is_weights.append(float(seq_is))
                    if clip is not None:
                        weight = weight * seq_is
                else:
                    ratio = torch.exp(block - sampler)
                    if clip is not None:
                        ratio = ratio.clamp(max=clip)
                    per_token = -ratio * (row.teacher.to(device, dtype) - sampler)
                    is_weights.append(float(_truncated_is_weight(block.detach(), sampler, mask, clip)))
                term = (per_token * weight.to(per_token.dtype)).sum()
                total = term if total is None else total + term
                per_tokens.append(per_token.detach().cpu())
            captured.update(per_tokens=per_tokens, is_weights=is_weights,
                            student=[lp.detach().cpu() for lp in logprobs])
            return total, {}
        return loss_fn

    def _step_values(self, output, rows: list[_RolloutRows], spec: LossSpec, builtin: bool,
                     captured: dict) -> tuple[float, float, list[float]]:
        """(objective, sum over loss tokens of the per-token divergence, per-rollout IS weights)."""
        if output is None:
            return 0.0, 0.0, []
        loss, divergence, is_weights = 0.0, 0.0, []
        if not builtin:
            per_tokens = captured["per_tokens"]
            for index, (row, per_token) in enumerate(zip(rows, per_tokens)):
                if spec.targets == "sampled":
                    student = captured["student"][index][row.first:row.first + row.weight.shape[0]].double()
                    divergence += float(((student - row.teacher) * row.mask).sum())
                else:
                    divergence += float((per_token.double() * row.mask).sum())
            loss = float(output.metrics.get("loss:sum", math.nan))
            return loss, divergence, list(captured["is_weights"])
        for row, out in zip(rows, output.loss_fn_outputs):
            count = row.weight.shape[0]
            logprobs = out["logprobs"].to_torch().double()[row.first:row.first + count]
            if spec.targets == "sampled":
                per_token = -torch.exp(logprobs - row.sampler) * (row.teacher - row.sampler)
                divergence += float(((logprobs - row.teacher) * row.mask).sum())
                is_weights.append(float(_truncated_is_weight(logprobs, row.sampler, row.mask, None)))
            else:
                per_token = topk_loss_from_logprobs(logprobs, row.ids, row.teacher, vocab_size=self.vocab_size,
                                                    normalize="renormalize", kind=spec.topk_kind)
                divergence += float((per_token * row.mask).sum())
            loss += float((per_token * row.weight).sum())
        return loss, divergence, is_weights

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], *,
                 micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of -sum_i sum_j log p(target_ij | ...) / sum_i len(target_i): built-in
        cross_entropy with weight 1 / (target tokens of the batch) on the target rows."""
        prompts, targets = check_sft_batch(prompt_ids, target_ids, micro_batch_size)
        start_time = time.perf_counter()
        total = sum(len(t) for t in targets)
        datums, spans = [], []
        for prompt, target in zip(prompts, targets):
            sequence = list(prompt) + list(target)
            weights = torch.zeros(len(sequence) - 1, dtype=torch.float32)
            weights[len(prompt) - 1:] = 1.0 / total
            datums.append(types.Datum(model_input=types.ModelInput.from_ints(sequence[:-1]), loss_fn_inputs={
                "target_tokens": torch.tensor(sequence[1:], dtype=torch.long), "weights": weights}))
            spans.append((len(prompt) - 1, weights.double()))
        training = self._training_client()
        lr = self.lr
        forward = training.forward_backward(datums, "cross_entropy")
        optim = training.optim_step(self._adam_params(lr))
        output, optim_result = _resolve(forward), _resolve(optim)
        self._steps += 1
        self._student = None
        loss = sum(float(-(w * out["logprobs"].to_torch().double()).sum())
                   for (_, w), out in zip(spans, output.loss_fn_outputs))
        elapsed = time.perf_counter() - start_time
        return {"loss": loss, "loss_tokens": float(total),
                "tokens_per_s": sum(len(p) + len(t) for p, t in zip(prompts, targets)) / elapsed,
                "step_time_s": elapsed, "lr": lr,
                "grad_norm": float((optim_result.metrics or {}).get("grad_norm", math.nan))}

    # ---------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"rng": {"seed_stream": the generator that draws sampling seeds when none are given}}; the weights
        and optimizer live on Tinker (see optimizer_state)."""
        return {"rng": {"seed_stream": self.generator.get_state()}}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if "rng" not in state or "seed_stream" not in state["rng"]:
            raise ValueError("state must have the group rng with the tensor seed_stream (written by "
                             f"TinkerBackend.state_tensors); got groups {sorted(state)}")
        self.generator.set_state(state["rng"]["seed_stream"].cpu())

    def optimizer_state(self) -> dict:
        """Saves weights and Adam state on Tinker (`save_state`) and returns {"tinker": {"state_path",
        "teacher_path" (None: the base model), "steps", "base_model"}} for the run's checkpoint."""
        training = self._training_client()
        name = f"{self.checkpoint_prefix}-state-{self._steps:06d}"
        path = self._call(lambda attempt: training.save_state(_retry_name(name, attempt)), "save_state").path
        return {"tinker": {"state_path": path, "teacher_path": self._teacher_path, "steps": self._steps,
                           "base_model": self.base_model}}

    def load_optimizer_state(self, state: dict) -> None:
        """Resume: a new training client from the saved state (weights and Adam), the saved teacher and
        step count; the student's sampling snapshot is taken again when first needed."""
        saved = state.get("tinker") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not {"state_path", "teacher_path", "steps", "base_model"} <= set(saved):
            raise ValueError("optimizer state must be {'tinker': {state_path, teacher_path, steps, base_model}} "
                             f"(written by TinkerBackend.optimizer_state); got {state!r}"[:300])
        if saved["base_model"] != self.base_model:
            raise ValueError(f"the checkpoint was trained on {saved['base_model']!r}, this backend runs "
                             f"{self.base_model!r}")
        path = saved["state_path"]
        self._training = self._call(
            lambda attempt: self.service.create_training_client_from_state_with_optimizer(path),
            "create_training_client_from_state_with_optimizer")
        self._steps = int(saved["steps"])
        self._teacher_path = saved["teacher_path"]
        self._teacher = None
        self._student = None

    # ---------------------------------------------------------------------------------- checks
    def _check_spec(self, spec: LossSpec) -> None:
        if not isinstance(spec, LossSpec):
            raise ValueError(f"spec must be a LossSpec, got {type(spec).__name__}")
        if spec.targets == "full":
            raise ValueError("loss.targets=full is not available on the Tinker backend: full-vocabulary targets need "
                             "the teacher's hidden states and Tinker exposes top-K log-probs only; allowed: "
                             "loss.targets=topk or loss.targets=sampled")
        if spec.temperature != 1.0:
            raise ValueError(f"loss.temperature={spec.temperature} is not available on the Tinker backend: Tinker "
                             "scores log-probs at temperature 1 only; allowed: loss.temperature=1.0")
        if spec.targets == "topk" and spec.topk > self.vocab_size:
            raise ValueError(f"topk must be at most the vocabulary size {self.vocab_size}, got {spec.topk}")


# ------------------------------------------------------------------------------------------- helpers
def topk_rows_from_response(topk_prompt_logprobs, *, prompt_len: int, completion_len: int, k: int,
                            vocab_size: int, where: str = "teacher response") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's top-K at the completion positions of one [prompt | completion] sequence.

    topk_prompt_logprobs: `SampleResponse.topk_prompt_logprobs`, one entry per sequence position (a list of
    (token id, log-prob) pairs, or None where not scored); entry prompt_len + j belongs to completion token
    j. Returns (ids [T, K] int64 with -1 for invalid slots, log-probs [T, K] float32 with 0 there, the
    number of invalid slots). Errors, never a guess, when the positions do not line up: a list whose length
    is not prompt_len + completion_len, a missing entry at a completion position, more than K pairs, or a
    malformed pair. Dropped: padding pairs (log-prob <= -99999 or not finite), ids outside
    [0, vocab_size), repeated ids; a list shorter than K leaves its last slots invalid.
    """
    if topk_prompt_logprobs is None:
        raise ValueError(f"{where} has no topk_prompt_logprobs; the request must set include_prompt_logprobs=True "
                         "and topk_prompt_logprobs=K")
    expected = prompt_len + completion_len
    if len(topk_prompt_logprobs) != expected:
        raise ValueError(f"{where} has top-K entries for {len(topk_prompt_logprobs)} positions, expected one per "
                         f"token of [teacher prompt | completion] ({prompt_len} + {completion_len} = {expected}); "
                         "refusing to guess how teacher positions align with completion tokens")
    ids = torch.full((completion_len, k), -1, dtype=torch.long)
    lps = torch.zeros((completion_len, k), dtype=torch.float32)
    invalid = 0
    for j in range(completion_len):
        entry = topk_prompt_logprobs[prompt_len + j]
        if entry is None:
            raise ValueError(f"{where} has no top-K entry for completion token {j} (sequence position "
                             f"{prompt_len + j}); was prompt_logprobs_last_n smaller than the completion?")
        if len(entry) > k:
            raise ValueError(f"{where} has {len(entry)} top-K pairs for completion token {j}, more than K={k}")
        seen = set()
        for slot, pair in enumerate(entry):
            try:
                token, logprob = int(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{where}: top-K pair {slot} of completion token {j} is {pair!r}, expected "
                                 "(token id, log-prob)") from None
            if not math.isfinite(logprob) or logprob <= PADDING_LOGPROB or not 0 <= token < vocab_size or token in seen:
                invalid += 1
                continue
            seen.add(token)
            ids[j, slot], lps[j, slot] = token, logprob
        invalid += k - len(entry)
    return ids, lps, invalid


def _sampled_rows(logprobs, prompt_len: int, completion_len: int, where: str) -> torch.Tensor:
    expected = prompt_len + completion_len
    if logprobs is None or len(logprobs) != expected:
        got = "none" if logprobs is None else len(logprobs)
        raise ValueError(f"{where} has log-probs for {got} positions, expected one per token of [teacher prompt | "
                         f"completion] ({expected})")
    values = logprobs[prompt_len:]
    bad = [j for j, v in enumerate(values) if v is None or not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"{where} has no finite log-prob for completion tokens {bad[:5]}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _truncated_is_weight(train_lp: torch.Tensor, sampler_lp: torch.Tensor, mask: torch.Tensor, clip) -> torch.Tensor:
    """mean over unmasked tokens of min(exp(train_lp - sampler_lp), clip) (1 when no token counts)."""
    ratio = torch.exp(train_lp - sampler_lp.to(train_lp.dtype))
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    maskf = mask.to(ratio.dtype)
    count = maskf.sum()
    return (ratio * maskf).sum() / count if count > 0 else torch.ones((), dtype=ratio.dtype, device=ratio.device)


def _sample_request(sampler, prompt: Sequence[int], params: types.SamplingParams) -> Callable[[int], Any]:
    model_input = types.ModelInput.from_ints(list(prompt))
    return lambda attempt: sampler.sample(prompt=model_input, num_samples=1, sampling_params=params)


def _topk_request(teacher, sequence: list[int], completion_len: int, k: int) -> Callable[[int], Any]:
    model_input = types.ModelInput.from_ints(sequence)
    params = types.SamplingParams(max_tokens=1, seed=0)
    return lambda attempt: teacher.sample(prompt=model_input, num_samples=1, sampling_params=params,
                                          include_prompt_logprobs=True, topk_prompt_logprobs=k,
                                          prompt_logprobs_last_n=completion_len)


def _logprob_request(teacher, sequence: list[int], completion_len: int) -> Callable[[int], Any]:
    model_input = types.ModelInput.from_ints(sequence)
    return lambda attempt: teacher.compute_logprobs(model_input, prompt_logprobs_last_n=completion_len)


def _first_sequence(response, where: str) -> tuple[list[int], list[float], bool]:
    if not response.sequences:
        raise ValueError(f"{where} holds no sequence")
    sequence = response.sequences[0]
    tokens = list(sequence.tokens)
    logprobs = sequence.logprobs
    if logprobs is None or len(logprobs) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens but "
                         f"{'no' if logprobs is None else len(logprobs)} sampler log-probs")
    return tokens, [float(x) for x in logprobs], sequence.stop_reason == "stop"


def _submit(submit: Callable[[int], Any], attempt: int):
    try:
        return submit(attempt)
    except TRANSIENT_ERRORS as error:
        return _Failed(error)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _resolve(value):
    """The result of a future (an SDK APIFuture, a concurrent Future, anything with .result()); other
    values (a client returned directly by an older SDK) unchanged."""
    if isinstance(value, _Failed):
        raise value.error
    if isinstance(value, (tinker.APIFuture, Future)) or callable(getattr(value, "result", None)):
        return value.result()
    return value


def _retry_name(name: str, attempt: int) -> str:
    return name if attempt == 0 else f"{name}-retry{attempt}"


def _eos_ids(tokenizer, eos_token_ids) -> list[int]:
    if eos_token_ids is not None:
        ids = [int(i) for i in eos_token_ids]
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [int(eos)] if eos is not None else []
    if not ids:
        raise ValueError("no EOS token: the tokenizer defines none; pass eos_token_ids")
    return ids


