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
  train_step       the objective's TinkerPlan (`sdft.objectives`): per rollout, the ids whose student log-probs
                   the loss reads at each completion position, and a built-in loss ("cross_entropy" with
                   [S - 1, K] weights, "importance_sampling" with advantages) or a custom loss for
                   forward_backward_custom; one forward_backward over all rollouts, then
                   optim_step(AdamParams(lr, beta1, beta2, eps, weight_decay, grad_clip_norm)) submitted before
                   waiting. Rows of non-completion positions are 0 in every datum input.
  sft_step         built-in "cross_entropy" with weight 1 / (target tokens in the batch) on target rows.
  checkpoints      `save_state` (weights + Adam state) path, teacher snapshot path and step count go into the
                   run's checkpoint (optimizer_state); resume builds the training client with
                   `create_training_client_from_state_with_optimizer`.

Reductions: Tinker sums its loss over datum rows; the objective puts its token weights (seq_mean, token_mean
or sum, the first skipped tokens at 0) into the datum weights or advantages, so every reduction optimizes the
same objective as locally. The cookbook uses the plain sum (reduction=sum).

Teacher responses are checked, never guessed (`sdft.backends.tinker_responses`).

Transient errors (connection, timeout, rate limit, server errors) of idempotent requests (sampling,
teacher scoring, snapshots, checkpoints, client creation) are retried `max_retries` times with exponential
backoff; forward_backward and optim_step are not retried (a repeated forward_backward could add its
gradient twice).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch

from sdft.backends.base import check_rollouts, check_sft_batch, check_teacher_prompts
from sdft.backends.tinker_responses import sampled_rows, topk_rows_from_response
from sdft.config import BackendConfig, OptimConfig, TeacherConfig
from sdft.objectives import Objective, SampledTargets, TinkerPlan, Targets, TopKTargets
from sdft.optim import lr_factor
from sdft.sampling.base import Rollout, SamplingParams, check_positive_int, check_token_lists, stop_token_ids

try:  # the SDK is an optional dependency: `pip install sdft[tinker]`
    import tinker
    from tinker import types
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Tinker backend needs the Tinker SDK: pip install 'sdft[tinker]' "
                      "(or pip install tinker)") from error

__all__ = ["TinkerBackend", "require_api_key", "API_KEY_VARIABLE"]

API_KEY_VARIABLE = "TINKER_API_KEY"

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


class TinkerBackend:
    """SDFT on the Tinker API; implements `sdft.backends.base.Backend` (see the module docstring).

    `base_model` must be served by the service (checked at construction). `tokenizer` gives the EOS ids
    and the vocabulary size (len(tokenizer)) unless `eos_token_ids` / `vocab_size` are given. The LoRA
    adapter (rank, seed, which layers) is created on first use; lr follows `schedule` over `total_steps`
    exactly as on the local backend (`sdft.optim.lr_factor`). `sleep` is the backoff's sleep function.
    """

    def __init__(self, tokenizer, *, backend: BackendConfig, teacher: TeacherConfig = TeacherConfig(mode="static"),
                 optim: OptimConfig = OptimConfig(), steps: int = 1, seed: int = 0, service_client=None,
                 rest_client=None, sleep: Callable[[float], None] = time.sleep, checkpoint_prefix: str = "sdft",
                 eos_token_ids: Sequence[int] | None = None, vocab_size: int | None = None):
        if not backend.tinker_base_model:
            raise ValueError("backend.tinker_base_model must name the Tinker base model")
        self.base_model = backend.tinker_base_model
        self.tokenizer = tokenizer
        self.eos_token_ids = stop_token_ids(tokenizer, None, eos_token_ids)
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("pass a tokenizer or vocab_size (ids at or above it are dropped from teacher top-K)")
            vocab_size = len(tokenizer)
        self.vocab_size = int(vocab_size)
        self.lora_rank, self.seed = backend.tinker_lora_rank, int(seed)
        self.train_unembed = backend.tinker_train_unembed
        self.teacher_mode, self.sync_every = teacher.mode, teacher.sync_every
        self.optim, self.total_steps = optim, steps
        self.max_retries, self.retry_backoff_s, self._sleep = backend.max_retries, backend.retry_backoff_s, sleep
        self.checkpoint_prefix = checkpoint_prefix
        self.notes = [f"backend: Tinker ({backend.tinker_service} service), base model {self.base_model}, "
                      f"LoRA rank {self.lora_rank}"]

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
                self.base_model, rank=self.lora_rank, seed=self.seed, train_unembed=self.train_unembed),
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
        o = self.optim
        return o.lr * lr_factor(self._steps, schedule=o.schedule, total_steps=self.total_steps,
                                warmup_ratio=o.warmup_ratio)

    def _adam_params(self, lr: float) -> types.AdamParams:
        o = self.optim
        return types.AdamParams(learning_rate=lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                                grad_clip_norm=float(o.max_grad_norm or 0.0))

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
                        objective: Objective) -> Targets:
        """Score every rollout's completion with the teacher on [teacher prompt | completion], all requests
        in flight at once, as the objective's TeacherRequest asks: TopKTargets (ids [T_i, K] with -1 for
        invalid slots, log-probs [T_i, K]) or SampledTargets. Teacher entropies are not available (None)."""
        prompts, rollouts = check_teacher_prompts(teacher_prompt_ids, rollouts)
        request = objective.teacher_request
        if request.kind == "hidden":
            raise ValueError("full-vocabulary targets need the teacher's hidden states, which Tinker does not expose; "
                             "use objective.targets=topk or objective.targets=sampled")
        if request.kind == "topk" and request.k > self.vocab_size:
            raise ValueError(f"objective.topk.k must be at most the vocabulary size {self.vocab_size}, got {request.k}")
        teacher = self._teacher_sampler()
        scored = [i for i, r in enumerate(rollouts) if r.completion_ids]
        sequences = {i: list(prompts[i]) + list(rollouts[i].completion_ids) for i in scored}
        if request.kind == "topk":
            submits = [_topk_request(teacher, sequences[i], len(rollouts[i].completion_ids), request.k) for i in scored]
        else:
            submits = [_logprob_request(teacher, sequences[i], len(rollouts[i].completion_ids)) for i in scored]
        responses = dict(zip(scored, self._gather(submits, "teacher scoring")))
        if request.kind == "topk":
            ids_out, lps_out = [], []
            for i, rollout in enumerate(rollouts):
                if i not in responses:
                    ids_out.append(torch.full((0, request.k), -1, dtype=torch.long))
                    lps_out.append(torch.zeros((0, request.k), dtype=torch.float32))
                    continue
                ids, lps, _ = topk_rows_from_response(
                    responses[i].topk_prompt_logprobs, prompt_len=len(prompts[i]),
                    completion_len=len(rollout.completion_ids), k=request.k, vocab_size=self.vocab_size,
                    where=f"teacher response for rollout {i}")
                ids_out.append(ids)
                lps_out.append(lps)
            return TopKTargets(tuple(ids_out), tuple(lps_out), None)
        lps_out = []
        for i, rollout in enumerate(rollouts):
            if i not in responses:
                lps_out.append(torch.zeros(0, dtype=torch.float32))
                continue
            lps_out.append(sampled_rows(responses[i], len(prompts[i]), len(rollout.completion_ids),
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
    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, objective: Objective) -> dict[str, float]:
        """One optimizer step of the objective's TinkerPlan over all rollouts; the metrics of the local
        backend (entropies, and on built-in losses that do not read the sampled token the importance
        weight, are not available on Tinker: NaN)."""
        rollouts = check_rollouts(rollouts)
        objective.check_targets(targets, rollouts)
        start_time = time.perf_counter()
        plan = objective.tinker_plan(rollouts, targets, vocab_size=self.vocab_size)
        datums, spans = [], []  # spans: (rollout index, first completion row, completion length)
        for i, rollout in enumerate(rollouts):
            if rollout.completion_ids:
                datum, span = _plan_datum(rollout, plan, i)
                datums.append(datum)
                spans.append(span)
        training = self._training_client()
        lr = self.lr
        captured: list[torch.Tensor] = []
        forward = None
        if datums:
            if plan.builtin is not None:
                forward = training.forward_backward(datums, plan.builtin)
            else:
                forward = training.forward_backward_custom(datums, _custom_loss(plan, spans, captured))
        optimizer_start = time.perf_counter()
        optim = training.optim_step(self._adam_params(lr))
        output = _resolve(forward) if forward is not None else None
        optim_result = _resolve(optim)
        optimizer_time = time.perf_counter() - optimizer_start
        self._steps += 1
        self._student = None

        if output is not None and plan.builtin is not None:
            captured = [out["logprobs"].to_torch().double()[first:first + count]
                        for out, (_, first, count) in zip(output.loss_fn_outputs, spans)]
        logprobs = [_empty_rows(plan.target_tokens[i]) for i in range(len(rollouts))]
        for (i, _, _), lp in zip(spans, captured):
            logprobs[i] = lp
        metrics = plan.sums(logprobs).metrics(rollouts=len(rollouts), counted=sum(objective.counted(rollouts)),
                                              completion_tokens=sum(len(r.completion_ids) for r in rollouts))
        metrics.update(objective.extra_metrics(targets))
        elapsed = time.perf_counter() - start_time
        metrics.update(optimizer_time_s=optimizer_time, step_time_s=elapsed, lr=lr,
                       tokens_per_s=sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts) / elapsed,
                       grad_norm=_grad_norm(optim_result))
        return metrics

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]) -> dict[str, float]:
        """One optimizer step of -sum_i sum_j log p(target_ij | ...) / sum_i len(target_i): built-in
        cross_entropy with weight 1 / (target tokens of the batch) on the target rows."""
        prompts, targets = check_sft_batch(prompt_ids, target_ids)
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
                "grad_norm": _grad_norm(optim_result)}

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

# ------------------------------------------------------------------------------------------- helpers
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


def _plan_datum(rollout: Rollout, plan: TinkerPlan, index: int) -> tuple[types.Datum, tuple[int, int, int]]:
    """The datum of rollout `index`: model_input = S[:-1] for S = prompt + completion, and the plan's
    per-completion-token rows placed at rows P - 1 .. P - 2 + T (0 elsewhere)."""
    sequence = list(rollout.prompt_ids) + list(rollout.completion_ids)
    length, first, count = len(sequence) - 1, len(rollout.prompt_ids) - 1, len(rollout.completion_ids)

    def placed(rows: torch.Tensor):
        full = torch.zeros((length,) + tuple(rows.shape[1:]), dtype=rows.dtype)
        full[first:first + count] = rows
        return types.TensorData.from_torch_sparse(full) if full.dim() == 2 else full

    inputs = {"target_tokens": placed(plan.target_tokens[index])}
    inputs.update({name: placed(value) for name, value in plan.inputs[index].items()})
    return types.Datum(model_input=types.ModelInput.from_ints(sequence[:-1]), loss_fn_inputs=inputs), (index, first, count)


def _custom_loss(plan: TinkerPlan, spans: list[tuple[int, int, int]], captured: list[torch.Tensor]):
    """forward_backward_custom's loss: the plan's objective on each datum's completion rows; the rows are
    also kept (detached) in `captured` for the step's metrics."""
    def loss_fn(data, logprobs):
        rows = [lp[first:first + count] for lp, (_, first, count) in zip(logprobs, spans)]
        captured[:] = [r.detach().cpu().double() for r in rows]
        per_rollout = [_empty_rows(plan.target_tokens[i], dtype=rows[0].dtype) for i in range(len(plan.target_tokens))]
        for (i, _, _), r in zip(spans, rows):
            per_rollout[i] = r
        return plan.custom(per_rollout), {}
    return loss_fn


def _empty_rows(target_tokens: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Log-probs shaped like a rollout's target tokens, for a rollout without completion tokens."""
    return torch.zeros(target_tokens.shape, dtype=dtype)


def _grad_norm(optim_result) -> float:
    return float((optim_result.metrics or {}).get("grad_norm", math.nan)) if optim_result is not None else math.nan
