"""Teacher modes on top of the student model: static (frozen base), EMA, or periodic sync.

LoRA student (a peft model):
  static: the same model with the adapter disabled (the base weights); no second copy.
  ema:    a second adapter `teacher_adapter` holding phi <- (1 - a) phi + a theta of the student adapter
          after every optimizer step, starting equal to the student adapter (zero effect: the base).
  sync:   the same second adapter, hard-copied from the student every `sync_every` steps.
Full fine-tuning:
  static: a frozen deep copy of the initial model; ema: an EMA copy (its running average optionally
  kept in fp32 while the model runs in bf16); sync: a copy refreshed every `sync_every` steps.

A teacher is built in two phases, because sharding replaces a model's parameters: `build_teacher` adds the
teacher's structure (the second adapter, or the copy, `Teacher.module`) to the unsharded model; after the
student (and the copy) are sharded or wrapped, `bind(student)` pairs each teacher tensor with its student
tensor. Under FSDP2 both are shards with the same placement, so the EMA and the copies run shard by shard
on each process (no gather).

`with teacher.active() as model:` yields the model to run as the teacher (the student's root module with the
teacher adapter active or no adapter, or the copy), in eval mode and under torch.no_grad(); the student
configuration is restored on exit.
"""
from __future__ import annotations

import abc
import copy
from contextlib import contextmanager
from typing import ContextManager, Iterator

import torch
from torch import nn

from sdft.checkpoint import check_state_tensors
from sdft.parallel import copy_whole

TEACHER_MODES = ("static", "ema", "sync")


class _Mirror:
    """Pairs of (teacher tensor, student tensor) with EMA and copy updates.

    When `fp32_master` is set and a teacher tensor is not fp32, the running value is kept in an fp32
    master tensor and the teacher tensor receives its rounded copy after every update.
    """

    def __init__(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], fp32_master: bool):
        self.pairs = pairs
        self.master = {
            name: teacher.detach().float().clone()
            for name, (teacher, _) in pairs.items()
            if fp32_master and teacher.dtype != torch.float32
        }

    @torch.no_grad()
    def ema(self, alpha: float) -> None:
        """phi <- (1 - alpha) * phi + alpha * theta, computed in the dtype of phi (fp32 master if kept)."""
        for name, (teacher, student) in self.pairs.items():
            target = self.master.get(name, teacher)
            target.mul_(1.0 - alpha).add_(student.detach().to(target.dtype), alpha=alpha)
            if target is not teacher:
                teacher.copy_(target)

    @torch.no_grad()
    def copy(self) -> None:
        """phi <- theta."""
        for name, (teacher, student) in self.pairs.items():
            teacher.copy_(student.detach().to(teacher.dtype))
            if name in self.master:
                self.master[name].copy_(student.detach())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The teacher values keyed by the student parameter name (fp32 master where kept); these are
        the live tensors, detached: copy them before the next update if they must not change."""
        return {name: self.master.get(name, teacher).detach()
                for name, (teacher, _) in self.pairs.items()}

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        check_state_tensors("teacher state", {name: teacher for name, (teacher, _) in self.pairs.items()}, state)
        for name, (teacher, _) in self.pairs.items():
            copy_whole(teacher, state[name])
            if name in self.master:
                copy_whole(self.master[name], state[name])


class Teacher(abc.ABC):
    """Common interface: `bind(student)`, `active()`, `update(step)`, `state_tensors()`, `load_state_tensors()`."""

    module: nn.Module | None = None  # a separate teacher model to shard like the student (full fine-tuning)

    def __init__(self, mode: str, ema_alpha: float, sync_every: int | None, ema_fp32: bool):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}; got {mode!r}")
        if not (isinstance(ema_alpha, (int, float)) and 0 < ema_alpha <= 1):
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha!r}")
        if mode == "sync" and (not isinstance(sync_every, int) or isinstance(sync_every, bool)
                               or sync_every < 1):
            raise ValueError(f"sync_every must be an int >= 1 for teacher mode 'sync', got {sync_every!r}")
        self.mode = mode
        self.ema_alpha = float(ema_alpha)
        self.sync_every = sync_every
        self.ema_fp32 = ema_fp32
        self.student: nn.Module | None = None
        self._mirror: _Mirror | None = None

    def bind(self, student: nn.Module) -> None:
        """Pair the teacher's tensors with the student's (call once the models are sharded or wrapped)."""
        self.student = student
        if self.mode != "static":
            self._mirror = _Mirror(self._pairs(student), self.ema_fp32 and self.mode == "ema")

    @abc.abstractmethod
    def _pairs(self, student: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{student parameter name: (teacher tensor, student tensor)} of what the teacher mirrors."""

    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based). ema: EMA update every call; sync: copy when
        step % sync_every == 0; static: nothing."""
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (optimizer steps done), got {step!r}")
        if self.mode == "ema":
            self._mirror.ema(self.ema_alpha)
        elif self.mode == "sync" and step % self.sync_every == 0:
            self._mirror.copy()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Teacher weights that a checkpoint must keep (empty for a static teacher)."""
        return {} if self._mirror is None else self._mirror.state_tensors()

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if self._mirror is None:
            if state:
                raise ValueError(f"a static teacher has no state, got {len(state)} tensors")
            return
        self._mirror.load_state_tensors(state)

    @abc.abstractmethod
    def active(self) -> ContextManager[nn.Module]:
        """A context in which the model computes as the teacher (eval mode, no grad)."""


class LoraTeacher(Teacher):
    """Teacher for a peft LoRA student; see the module docstring."""

    def __init__(self, model, *, mode: str = "static", ema_alpha: float = 0.01, sync_every: int | None = None,
                 ema_fp32: bool = False, teacher_adapter: str = "teacher"):
        super().__init__(mode, ema_alpha, sync_every, ema_fp32)
        self.student_adapter = model.active_adapter
        self.teacher_adapter = teacher_adapter
        if mode == "static":
            return
        if teacher_adapter in model.peft_config:
            raise ValueError(f"teacher_adapter {teacher_adapter!r} already exists on the model; "
                             f"pick a name other than {sorted(model.peft_config)}")
        model.add_adapter(teacher_adapter, copy.deepcopy(model.peft_config[self.student_adapter]))
        for name, param in model.named_parameters():
            if teacher_adapter in name.split("."):
                param.requires_grad_(False)

    def _pairs(self, student):
        params = dict(_unwrapped(student).named_parameters())
        pairs = {}
        for name, param in params.items():
            parts = name.split(".")
            if self.student_adapter not in parts:
                continue
            teacher_name = ".".join(self.teacher_adapter if p == self.student_adapter else p for p in parts)
            if teacher_name not in params:
                raise ValueError(f"adapter parameter {name!r} has no teacher counterpart {teacher_name!r}")
            pairs[name] = (params[teacher_name], param)
        if not pairs:
            raise ValueError(f"the model has no parameters of adapter {self.student_adapter!r}")
        return pairs

    def bind(self, student: nn.Module) -> None:
        super().bind(student)
        if self._mirror is not None:
            self._mirror.copy()  # the teacher adapter starts equal to the student's

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        model = _unwrapped(self.student)  # a DDP replica's module: the teacher's forward needs no gradient sync
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.mode == "static":
                    with model.disable_adapter():
                        yield model
                else:
                    model.set_adapter(self.teacher_adapter, inference_mode=True)
                    try:
                        yield model
                    finally:
                        model.set_adapter(self.student_adapter)
        finally:
            model.train(was_training)


class FullTeacher(Teacher):
    """Teacher for a fully fine-tuned student: a separate frozen copy of the model (`module`)."""

    def __init__(self, model: nn.Module, *, mode: str = "static", ema_alpha: float = 0.01,
                 sync_every: int | None = None, ema_fp32: bool = False):
        super().__init__(mode, ema_alpha, sync_every, ema_fp32)
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)

    def _pairs(self, student):
        teacher_params = dict(self.module.named_parameters())
        return {name: (teacher_params[name], param) for name, param in _unwrapped(student).named_parameters()}

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            yield self.module


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_teacher(model: nn.Module, *, mode: str = "static", ema_alpha: float = 0.01,
                  sync_every: int | None = None, ema_fp32: bool = False, bind: bool = True) -> Teacher:
    """LoraTeacher for a peft model, FullTeacher otherwise; bound to `model` unless bind=False (then call
    `bind` once the models are sharded)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        teacher = LoraTeacher(model, mode=mode, ema_alpha=ema_alpha, sync_every=sync_every, ema_fp32=ema_fp32)
    else:
        teacher = FullTeacher(model, mode=mode, ema_alpha=ema_alpha, sync_every=sync_every, ema_fp32=ema_fp32)
    if bind:
        teacher.bind(model)
    return teacher
