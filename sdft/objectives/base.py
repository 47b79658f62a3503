"""The Objective interface: what an SDFT step optimizes, independent of the backend that runs it.

An objective
  - declares what it needs from the teacher at each completion position (`teacher_request`),
  - weights the tokens of a batch: token t of rollout i (T_i tokens, n rollouts) counts iff
    t >= skip_first_n_tokens; with c_i such tokens, its weight is 1 / (c_i n) for "seq_mean", 1 / sum_j c_j
    for "token_mean" and 1 for "sum" (decided over the whole optimizer batch, so micro-batches and processes
    add up to the same gradient),
  - owns the truncated importance weight: per rollout, is_i = mean over its counted tokens of
    min(exp(log p_train - log p_sampler), is_clip), detached; full-vocabulary and top-K objectives multiply
    rollout i's token weights by is_i (when is_clip is set), the sampled-token objective clamps its
    per-token ratio instead,
  - computes its loss through `sdft.losses` on the local backend (`local_loss`, from the student's
    final-norm hidden states and output layer) and describes itself as Tinker loss inputs (`tinker_plan`),
  - sums the same metrics on both (`StepSums`).

Shapes: T_i completion tokens of rollout i; N = sum of T_i over a micro-batch; K top-K width;
H / Ht student / teacher hidden size; V vocabulary size.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Sequence, Union

import torch

from sdft.losses import fused_linear_token_logprobs
from sdft.sampling.base import Rollout

if TYPE_CHECKING:
    from sdft.objectives.config import ObjectiveConfig

__all__ = ["TeacherRequest", "FullVocabTargets", "TopKTargets", "SampledTargets", "Targets",
           "StudentTokens", "TinkerPlan", "StepSums", "Objective", "truncated_is_weight"]


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher computes at each completion position, at softmax temperature `temperature`:
    "hidden" - its final-norm hidden states and output layer (full-vocabulary targets, local backend only);
    "topk"   - its `k` most likely ids and their log-probs (normalized over the full vocabulary);
    "logprobs" - the log-prob of the sampled token."""

    kind: Literal["hidden", "topk", "logprobs"]
    k: int = 0
    temperature: float = 1.0
    impl: str = "auto"
    chunk_size: int | None = None


@dataclass(frozen=True)
class FullVocabTargets:
    """Teacher final-norm hidden states at the completion positions: hidden[i] [T_i, Ht], row j predicts
    completion token j of rollout i; weight [V, Ht] / bias [V] or None: the teacher's output layer (teacher
    logits = hidden @ weight.T + bias); teacher_entropy[i] [T_i] (metrics) or None."""

    hidden: tuple[torch.Tensor, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class TopKTargets:
    """Teacher top-K at each completion position: ids[i] [T_i, K] int64 (-1: an invalid slot) and logprobs[i]
    [T_i, K] fp32 normalized over the full vocabulary; teacher_entropy[i] [T_i] or None."""

    ids: tuple[torch.Tensor, ...]
    logprobs: tuple[torch.Tensor, ...]
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class SampledTargets:
    """Teacher log-prob of each sampled completion token: teacher_logprobs[i] [T_i] fp32; teacher_entropy or None."""

    teacher_logprobs: tuple[torch.Tensor, ...]
    teacher_entropy: tuple[torch.Tensor, ...] | None = None


Targets = Union[FullVocabTargets, TopKTargets, SampledTargets]
TARGETS_OF_REQUEST = {"hidden": FullVocabTargets, "topk": TopKTargets, "logprobs": SampledTargets}


@dataclass
class StudentTokens:
    """One micro-batch of the student on the local backend, flattened over its rollouts.

    hidden [N, H] (differentiable), weight [V, H] and bias [V] or None: the output layer; token_ids [N]: the
    sampled tokens; sampler_logprobs [N]; seq [N]: the rollout (0..n-1 within the micro-batch) of each
    token; mask [N] bool: the token counts in the loss; weights [N]: its reduction weight (0 where masked);
    rollouts: the indices of these rollouts in the whole batch (to select their targets)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    token_ids: torch.Tensor
    sampler_logprobs: torch.Tensor
    seq: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    rollouts: list[int]

    def select(self, per_rollout: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows of these rollouts from a per-rollout sequence of [T_i, ...] tensors, on the student's device."""
        return torch.cat([per_rollout[i] for i in self.rollouts]).to(self.hidden.device)


@dataclass
class TinkerPlan:
    """How one train step runs on Tinker, per rollout i with T_i completion tokens.

    target_tokens[i] [T_i, K'] (or [T_i]): the ids whose student log-probs the loss reads at each completion
    position. builtin: the name of a built-in Tinker loss ("cross_entropy" or "importance_sampling") whose
    extra inputs are inputs[i] (name -> [T_i, K'] or [T_i] tensors), or None: forward_backward_custom with
    `custom(logprobs)`, logprobs[i] [T_i, K'] differentiable -> the objective (scalar). In the datum, rows of
    non-completion positions are 0. `sums(logprobs)` -> StepSums of the step from detached log-probs."""

    target_tokens: list[torch.Tensor]
    builtin: str | None
    inputs: list[dict[str, torch.Tensor]]
    custom: Callable[[list[torch.Tensor]], torch.Tensor] | None
    sums: Callable[[list[torch.Tensor]], "StepSums"]


@dataclass
class StepSums:
    """Sums over the loss tokens of one optimizer step, added up over micro-batches (and processes)."""

    loss: float = 0.0
    divergence: float = 0.0
    student_entropy: float = math.nan
    teacher_entropy: float = math.nan
    is_weights: list[float] = field(default_factory=list)

    def add(self, other: "StepSums") -> None:
        self.loss += other.loss
        self.divergence += other.divergence
        self.student_entropy = _nan_sum(self.student_entropy, other.student_entropy)
        self.teacher_entropy = _nan_sum(self.teacher_entropy, other.teacher_entropy)
        self.is_weights.extend(other.is_weights)

    def metrics(self, *, rollouts: int, completion_tokens: int, counted: int) -> dict[str, float]:
        """loss (the objective), kl (mean over loss tokens of the per-token divergence), teacher_entropy /
        student_entropy (means over loss tokens; NaN where unknown), completion_len (mean), loss_tokens,
        is_weight_mean (mean per-rollout truncated IS weight; a diagnostic of sampler/trainer mismatch).
        The counts are those of the whole batch (all processes)."""
        denominator = max(counted, 1)
        return {
            "loss": self.loss,
            "kl": self.divergence / denominator,
            "teacher_entropy": self.teacher_entropy / denominator,
            "student_entropy": self.student_entropy / denominator,
            "completion_len": completion_tokens / max(rollouts, 1),
            "loss_tokens": float(counted),
            "is_weight_mean": sum(self.is_weights) / len(self.is_weights) if self.is_weights else math.nan,
        }

    def summed(self, sum_over_processes: Callable[[Sequence[float]], list[float]]) -> "StepSums":
        """These sums added over the processes of a data-parallel step (the IS weights as their mean)."""
        total = sum_over_processes([self.loss, self.divergence, self.student_entropy, self.teacher_entropy,
                                    sum(self.is_weights), len(self.is_weights)])
        loss, divergence, student_entropy, teacher_entropy, is_sum, is_count = total
        return StepSums(loss, divergence, student_entropy, teacher_entropy,
                        [is_sum / is_count] if is_count else [])


def _nan_sum(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    return a if math.isnan(b) else a + b


def truncated_is_weight(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                        seq: torch.Tensor, n_seq: int, clip: float | None) -> torch.Tensor:
    """Per sequence: mean over its masked-in tokens of min(exp(train_lp - sampler_lp), clip) [n_seq]
    (no clamp when clip is None; 1 for a sequence without counted tokens). Inputs [N]; computed in float32,
    or float64 for float64 inputs. Detached."""
    dtype = torch.float64 if train_logprobs.dtype == torch.float64 else torch.float32
    ratio = torch.exp(train_logprobs.detach().to(dtype) - sampler_logprobs.to(dtype))
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    maskf = mask.to(dtype)
    ratio = torch.where(mask, ratio, torch.zeros_like(ratio))
    total = torch.zeros(n_seq, dtype=dtype, device=ratio.device).index_add_(0, seq, ratio)
    count = torch.zeros(n_seq, dtype=dtype, device=ratio.device).index_add_(0, seq, maskf)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


class Objective(abc.ABC):
    """Base of the objectives (one per kind of teacher target)."""

    targets_type: type = FullVocabTargets

    def __init__(self, settings: "ObjectiveConfig"):
        self.settings = settings

    # ----------------------------------------------------------------------------------- the teacher
    @property
    @abc.abstractmethod
    def teacher_request(self) -> TeacherRequest:
        """What the backend's teacher must compute."""

    def check_targets(self, targets: Targets, rollouts: Sequence[Rollout]) -> None:
        """`targets` is this objective's Targets class with one [T_i, ...] tensor per rollout."""
        expected = self.targets_type
        if not isinstance(targets, expected):
            raise ValueError(f"targets must be {expected.__name__} for {type(self).__name__}, "
                             f"got {type(targets).__name__}")
        per_rollout = {FullVocabTargets: "hidden", TopKTargets: "ids", SampledTargets: "teacher_logprobs"}[expected]
        tensors = getattr(targets, per_rollout)
        if len(tensors) != len(rollouts):
            raise ValueError(f"targets.{per_rollout} must have one entry per rollout: got {len(tensors)} for "
                             f"{len(rollouts)} rollouts")
        for i, (tensor, rollout) in enumerate(zip(tensors, rollouts)):
            if tensor.shape[0] != len(rollout.completion_ids):
                raise ValueError(f"targets.{per_rollout}[{i}] has {tensor.shape[0]} rows, expected one per "
                                 f"completion token ({len(rollout.completion_ids)})")
            if expected is TopKTargets and (tensor.dim() != 2 or targets.logprobs[i].shape != tensor.shape):
                raise ValueError(f"targets.ids[{i}] {tuple(tensor.shape)} and targets.logprobs[{i}] "
                                 f"{tuple(targets.logprobs[i].shape)} must both be [T, K]")

    def extra_metrics(self, targets: Targets) -> dict[str, float]:
        """Metrics of this kind of target beside those of StepSums (none by default)."""
        return {}

    # -------------------------------------------------------------------------------- token weights
    def loss_mask(self, length: int, device=None) -> torch.Tensor:
        """[T] bool: which completion tokens get a loss."""
        return torch.arange(length, device=device) >= self.settings.skip_first_n_tokens

    def counted(self, rollouts: Sequence[Rollout]) -> list[int]:
        """Per rollout, the number of tokens that get a loss."""
        return [max(0, len(r.completion_ids) - self.settings.skip_first_n_tokens) for r in rollouts]

    def batch_totals(self, rollouts: Sequence[Rollout]) -> tuple[int, int]:
        """(rollouts, tokens that get a loss) of these rollouts."""
        return len(rollouts), sum(self.counted(rollouts))

    def sequence_weights(self, rollouts: Sequence[Rollout], totals: Sequence[float] | None = None) -> list[float]:
        """Per rollout i, the weight w_i of each of its loss tokens (see the module docstring). `totals`: the
        (rollouts, loss tokens) of the whole batch when these rollouts are one process's share of it."""
        counted = self.counted(rollouts)
        n, total_counted = totals if totals is not None else self.batch_totals(rollouts)
        if self.settings.reduction == "seq_mean":
            return [1.0 / (c * n) if c else 0.0 for c in counted]
        if self.settings.reduction == "token_mean":
            return [1.0 / max(total_counted, 1)] * len(rollouts)
        return [1.0] * len(rollouts)

    def token_weights(self, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
        """Per rollout, [T_i] float64: its sequence weight on loss tokens, 0 on skipped tokens."""
        out = []
        for rollout, w in zip(rollouts, self.sequence_weights(rollouts)):
            mask = self.loss_mask(len(rollout.completion_ids))
            out.append(torch.where(mask, torch.full(mask.shape, w, dtype=torch.float64),
                                   torch.zeros(mask.shape, dtype=torch.float64)))
        return out

    # ------------------------------------------------------------------------------- local backend
    def student_logprobs(self, student: StudentTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p_student of the sampled tokens [N], student entropy [N]) at the objective's temperature;
        without gradient here (the sampled-token objective keeps it)."""
        s = self.settings
        with torch.no_grad():
            return fused_linear_token_logprobs(
                student.hidden.detach(), student.weight.detach(), student.token_ids,
                bias=None if student.bias is None else student.bias.detach(), temperature=s.temperature,
                chunk_size=s.chunk_size, impl=s.impl, return_entropy=True)

    def local_loss(self, student: StudentTokens, targets: Targets) -> tuple[torch.Tensor, StepSums]:
        """The micro-batch's part of the objective (a scalar to backward) and its metric sums."""
        student_lp, student_entropy = self.student_logprobs(student)
        seq_is = truncated_is_weight(student_lp, student.sampler_logprobs, student.mask, student.seq,
                                     len(student.rollouts), self.settings.is_clip)
        loss, divergence = self.per_token_loss(student, targets, student_lp, seq_is)
        mask = student.mask
        sums = StepSums(loss=float(loss.detach()), divergence=float(divergence[mask].double().sum()),
                        student_entropy=float(student_entropy[mask].double().sum()), is_weights=seq_is.tolist())
        if targets.teacher_entropy is not None:
            sums.teacher_entropy = float(student.select(targets.teacher_entropy)[mask].double().sum())
        return loss, sums

    def is_scaled_weights(self, student: StudentTokens, seq_is: torch.Tensor) -> torch.Tensor:
        """The token weights times the rollout's truncated IS weight when is_clip is set."""
        weights = student.weights
        if self.settings.is_clip is not None:
            weights = weights * seq_is[student.seq].to(weights.dtype)
        return weights

    @abc.abstractmethod
    def per_token_loss(self, student: StudentTokens, targets: Targets, student_logprobs: torch.Tensor,
                       seq_is: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_t w_t loss_t over the micro-batch, a scalar with gradient; the per-token divergence [N] detached,
        the metric `kl`)."""

    # ------------------------------------------------------------------------------ tinker backend
    @abc.abstractmethod
    def tinker_plan(self, rollouts: Sequence[Rollout], targets: Targets, *, vocab_size: int) -> TinkerPlan:
        """This objective as Tinker loss inputs (see TinkerPlan)."""
