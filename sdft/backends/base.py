"""The Backend protocol and the data it passes between the loop's stages.

One SDFT step is `sample -> teacher_targets -> train_step -> update_teacher`. The data classes below are
what flows between those calls; they hold token ids as tuples of ints and per-token tensors as one tensor
per rollout (no padding), so that a backend decides its own batching.

Shapes: T_i = number of completion tokens of rollout i, K = top-K width, Ht = teacher hidden size,
V = vocabulary size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, Union, runtime_checkable

import torch

from sdft.losses._checks import IMPLS, TOPK_KINDS, TOPK_NORMALIZE
from sdft.losses._checks import KL_KINDS as DIVERGENCE_KINDS
from sdft.losses.reference import topk_teacher_weights

TARGET_KINDS = ("full", "topk", "sampled")
TOPK_LOSS_KINDS = TOPK_KINDS + ("reverse_kl",)  # reverse_kl: computed by the backends, see topk_loss_from_logprobs
REDUCTIONS = ("seq_mean", "token_mean", "sum")  # the batch-level reductions a train step offers


@dataclass(frozen=True)
class SamplingParams:
    """On-policy sampling: up to `max_new_tokens` tokens from softmax(z / temperature), nucleus `top_p`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion.

    `completion_ids` ends with the EOS token when `finished` is True (EOS included, padding never);
    otherwise it stopped at `max_new_tokens`. `sampler_logprobs[j]` is the log-probability of
    `completion_ids[j]` under the distribution it was sampled from (temperature and top_p applied).
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]
    finished: bool

    def __post_init__(self):
        if len(self.prompt_ids) == 0:
            raise ValueError("prompt_ids must hold at least one token, got an empty sequence")
        if len(self.sampler_logprobs) != len(self.completion_ids):
            raise ValueError(
                f"sampler_logprobs must have one entry per completion token: got {len(self.sampler_logprobs)} "
                f"log-probs for {len(self.completion_ids)} completion tokens"
            )


@dataclass(frozen=True)
class LossSpec:
    """What the train step optimizes.

    targets: "full" (full-vocabulary divergence `kind` in forward/reverse/jsd with `beta`, local backend
      only), "topk" (teacher top-`topk` log-probs, `topk_normalize` in renormalize/tail, `topk_kind` in
      cross_entropy/forward_kl/reverse_kl, the last with renormalize only, see `topk_loss_from_logprobs`)
      or "sampled" (sampled-token importance-sampling loss, the topk=0 fallback).
    temperature: p = softmax(z / temperature) for teacher and student.
    skip_first_n_tokens: the first n completion tokens of every rollout get no loss.
    reduction over the whole optimizer batch: "seq_mean" (token mean per sequence, then mean over all
      sequences of the batch), "token_mean" (mean over all unmasked tokens) or "sum".
    is_clip: when set, each sequence's loss is multiplied by the detached truncated importance weight
      mean_t min(exp(logp_train_t - logp_sampler_t), is_clip) over its unmasked tokens (logp_train at
      `temperature`, so it should equal the sampling temperature); for "sampled" targets it is instead
      the per-token ratio clamp of the sampled-token loss.
    impl, chunk_size: passed to the fused losses.
    """

    targets: str = "full"
    kind: str = "forward"
    beta: float = 0.5
    topk: int = 20
    topk_normalize: str = "renormalize"
    topk_kind: str = "cross_entropy"
    temperature: float = 1.0
    skip_first_n_tokens: int = 3
    reduction: str = "seq_mean"
    is_clip: float | None = None
    impl: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self):
        _choice("targets", self.targets, TARGET_KINDS)
        _choice("kind", self.kind, DIVERGENCE_KINDS)
        _choice("topk_normalize", self.topk_normalize, TOPK_NORMALIZE)
        _choice("topk_kind", self.topk_kind, TOPK_LOSS_KINDS)
        if self.topk_kind == "reverse_kl" and self.topk_normalize != "renormalize":
            raise ValueError(f"topk_kind='reverse_kl' needs topk_normalize='renormalize' (the reverse KL between "
                             f"the renormalized top-K distributions); got topk_normalize={self.topk_normalize!r}")
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("impl", self.impl, IMPLS)
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1):
            raise ValueError(f"beta must be in [0, 1], got {self.beta!r}")
        if self.targets == "topk" and (not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"topk must be an int >= 1 for targets='topk', got {self.topk!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        if not isinstance(self.skip_first_n_tokens, int) or self.skip_first_n_tokens < 0:
            raise ValueError(f"skip_first_n_tokens must be an int >= 0, got {self.skip_first_n_tokens!r}")
        if self.is_clip is not None and not (isinstance(self.is_clip, (int, float)) and self.is_clip > 0):
            raise ValueError(f"is_clip must be None or a float > 0, got {self.is_clip!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")


@dataclass(frozen=True)
class FullVocabTargets:
    """Teacher final-norm hidden states at the completion positions (local backend only).

    hidden[i]: [T_i, Ht], row j is the teacher hidden state that predicts completion token j of rollout i.
    weight [V, Ht] / bias [V] or None: the teacher's output layer, so teacher logits = hidden @ weight.T + bias.
    teacher_entropy[i]: [T_i] entropy of the teacher distribution at each position (metrics only).
    """

    hidden: tuple[torch.Tensor, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class TopKTargets:
    """Teacher top-K at each completion position: ids[i] [T_i, K] int64 and logprobs[i] [T_i, K] fp32,
    log-probabilities normalized over the full vocabulary; teacher_entropy[i] [T_i] or None."""

    ids: tuple[torch.Tensor, ...]
    logprobs: tuple[torch.Tensor, ...]
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class SampledTargets:
    """Teacher log-probability of each sampled completion token: teacher_logprobs[i] [T_i] fp32;
    teacher_entropy[i] [T_i] or None."""

    teacher_logprobs: tuple[torch.Tensor, ...]
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


Targets = Union[FullVocabTargets, TopKTargets, SampledTargets]


@runtime_checkable
class Backend(Protocol):
    """A model that can be sampled, scored as a teacher and trained; the loop sees only this."""

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        ...

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
               seeds: Sequence[int] | None = None) -> list[Rollout]:
        """One on-policy completion per prompt from the student. With `seeds`, prompt i is sampled from
        its own random stream seeded by seeds[i], so its completion does not depend on batching, sharding
        across processes or order."""
        ...

    def teacher_targets(self, teacher_prompt_ids: Sequence[Sequence[int]], rollouts: Sequence[Rollout],
                        spec: LossSpec) -> Targets:
        """Score each rollout's completion with the teacher on [teacher prompt | completion]."""
        ...

    def train_step(self, rollouts: Sequence[Rollout], targets: Targets, spec: LossSpec, *,
                   micro_batch_size: int) -> dict[str, float]:
        """One optimizer step over the whole batch (gradient accumulation over micro-batches)."""
        ...

    def update_teacher(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based): EMA update or periodic sync."""
        ...

    def generate_greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        batch_size: int | None = None) -> list[list[int]]:
        """Greedy completions from the student (EOS included when produced), `batch_size` prompts at a time."""
        ...

    def sft_step(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], *,
                 micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of cross-entropy on the target tokens, token mean over the batch."""
        ...

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        ...

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        ...

    def optimizer_state(self) -> dict:
        ...

    def load_optimizer_state(self, state: dict) -> None:
        ...


def topk_loss_from_logprobs(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                            *, vocab_size: int, normalize: str, kind: str) -> torch.Tensor:
    """Per-token top-K loss [N] from the student's log-probabilities at the teacher's top-K ids.

    student_logprobs [N, K]: log p_s(id_k), normalized over the FULL vocabulary (for kind="reverse_kl" any
    per-row constant may be added, e.g. the student logits at the ids may be passed). topk_ids [N, K]:
    slots with id < 0 or >= vocab_size are invalid and ignored. teacher_logprobs [N, K]. The teacher
    weights q (and q_tail) are those of `sdft.losses.reference.topk_teacher_weights`.
      cross_entropy: -sum_k q_k log p_s(id_k)    forward_kl: sum_k q_k (log q_k - log p_s(id_k))
        (tail adds the bucket -q_tail log s_tail, resp. q_tail (log q_tail - log s_tail), with
        s_tail = 1 - sum_k p_s(id_k)): the same values as `sdft.losses.topk_distill_loss`.
      reverse_kl (renormalize only): with p~ = softmax over the valid slots of the student log-probs,
        sum_k p~_k (log p~_k - log q_k), the reverse KL between the two renormalized top-K distributions.
    A row without a valid slot gives 0. Computed in float32 (float64 for float64 student inputs).
    """
    if kind not in TOPK_LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TOPK_LOSS_KINDS)}; got {kind!r}")
    if kind == "reverse_kl" and normalize != "renormalize":
        raise ValueError(f"kind='reverse_kl' needs normalize='renormalize', got {normalize!r}")
    dtype = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    lp = student_logprobs.to(dtype)
    valid, q, q_tail = topk_teacher_weights(topk_ids, teacher_logprobs, vocab_size, normalize)
    q, q_tail = q.to(dtype), q_tail.to(dtype)
    zero = torch.zeros_like(lp)
    any_valid = valid.any(dim=-1)
    if kind == "reverse_kl":
        masked = torch.where(valid, lp, torch.full_like(lp, -math.inf))
        lse = torch.logsumexp(torch.where(any_valid[:, None], masked, zero), dim=-1, keepdim=True)
        log_p = torch.where(valid, lp - lse, zero)
        p = torch.where(valid, log_p.exp(), zero)
        log_q = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
        return torch.where(valid & (q > 0), p * (log_p - log_q), zero).sum(-1)  # 0 on rows without a valid slot
    safe_lp = torch.where(valid, lp, zero)
    per_token = -torch.where(q > 0, q * safe_lp, zero).sum(-1)
    if kind == "forward_kl":
        per_token = per_token + torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones_like(q))),
                                            zero).sum(-1)
    if normalize == "tail":
        mass = torch.where(valid, safe_lp.exp(), zero).sum(-1)
        log_tail = torch.log1p(-mass.clamp(max=1.0 - torch.finfo(dtype).eps))
        has_tail = q_tail > 0
        safe_q_tail = torch.where(has_tail, q_tail, torch.ones_like(q_tail))
        tail = -q_tail * log_tail
        if kind == "forward_kl":
            tail = tail + q_tail * torch.log(safe_q_tail)
        per_token = per_token + torch.where(has_tail, tail, torch.zeros_like(tail))
    return per_token


TARGET_TYPES = {"full": FullVocabTargets, "topk": TopKTargets, "sampled": SampledTargets}


def sequence_weights(rollouts: Sequence[Rollout], spec: LossSpec) -> tuple[list[int], list[float]]:
    """Per rollout i: c_i = tokens that get a loss (T_i minus the skipped first tokens) and the weight w_i
    of its per-token losses in the batch objective sum_i w_i sum_t l_it: seq_mean 1 / (c_i n), token_mean
    1 / sum_j c_j, sum 1."""
    n = len(rollouts)
    counted = [max(0, len(r.completion_ids) - spec.skip_first_n_tokens) for r in rollouts]
    if spec.reduction == "seq_mean":
        return counted, [1.0 / (c * n) if c else 0.0 for c in counted]
    if spec.reduction == "token_mean":
        return counted, [1.0 / max(sum(counted), 1)] * n
    return counted, [1.0] * n


# ------------------------------------------------------------------------- argument checks of backends
def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_token_lists(name: str, value) -> list[list[int]]:
    """Non-empty sequences of token ids, as lists."""
    lists = [list(seq) for seq in value]
    if not lists:
        raise ValueError(f"{name} must hold at least one sequence, got none")
    for i, seq in enumerate(lists):
        if not seq:
            raise ValueError(f"{name}[{i}] must hold at least one token, got an empty sequence")
    return lists


def check_train_step(rollouts, targets, spec, micro_batch_size) -> list[Rollout]:
    """The arguments of `Backend.train_step`: a LossSpec, rollouts, targets matching both; returns the rollouts."""
    check_positive_int("micro_batch_size", micro_batch_size)
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be a LossSpec, got {type(spec).__name__}")
    rollouts = check_rollouts(rollouts)
    check_targets(targets, spec, rollouts)
    return rollouts


def check_sft_batch(prompt_ids, target_ids, micro_batch_size) -> tuple[list[list[int]], list[list[int]]]:
    """The arguments of `Backend.sft_step`: one non-empty target per non-empty prompt, as lists."""
    check_positive_int("micro_batch_size", micro_batch_size)
    prompts = check_token_lists("prompt_ids", prompt_ids)
    targets = check_token_lists("target_ids", target_ids)
    if len(prompts) != len(targets):
        raise ValueError(f"target_ids must have one target per prompt: got {len(targets)} targets for "
                         f"{len(prompts)} prompts")
    return prompts, targets


def check_rollouts(rollouts) -> list[Rollout]:
    rollouts = list(rollouts)
    if not rollouts:
        raise ValueError("rollouts must hold at least one Rollout, got none")
    for i, r in enumerate(rollouts):
        if not isinstance(r, Rollout):
            raise ValueError(f"rollouts[{i}] must be a Rollout, got {type(r).__name__}")
    return rollouts


def check_targets(targets, spec: LossSpec, rollouts: Sequence[Rollout]) -> None:
    """`targets` is the Targets class of spec.targets with one [T_i, ...] tensor per rollout ([T_i, K] ids
    and log-probs for top-K)."""
    expected = TARGET_TYPES[spec.targets]
    if not isinstance(targets, expected):
        raise ValueError(f"targets must be {expected.__name__} for spec.targets={spec.targets!r}, "
                         f"got {type(targets).__name__}")
    per_rollout = {FullVocabTargets: "hidden", TopKTargets: "ids", SampledTargets: "teacher_logprobs"}[expected]
    tensors = getattr(targets, per_rollout)
    if len(tensors) != len(rollouts):
        raise ValueError(f"targets.{per_rollout} must have one entry per rollout: got {len(tensors)} for "
                         f"{len(rollouts)} rollouts")
    for i, (tensor, rollout) in enumerate(zip(tensors, rollouts)):
        if tensor.shape[0] != len(rollout.completion_ids):
            raise ValueError(f"targets.{per_rollout}[{i}] has {tensor.shape[0]} rows, expected one per completion "
                             f"token ({len(rollout.completion_ids)})")
        if expected is TopKTargets and (tensor.dim() != 2 or targets.logprobs[i].shape != tensor.shape):
            raise ValueError(f"targets.ids[{i}] {tuple(tensor.shape)} and targets.logprobs[{i}] "
                             f"{tuple(targets.logprobs[i].shape)} must both be [T, K]")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
