"""The non-finite-value contract of sdft.losses, as a matrix over functions x impls x reductions x where the
bad value is (see sdft/losses/_reduction.py):
  unmasked  a NaN (or an inf that makes the math undefined) in one row of one input gives a NaN loss (with
            reduction="none": NaN at that token, the other tokens unchanged) and NaN gradients; the other
            rows' gradients equal those of a clean run;
  masked    NaN, +inf and -inf in every input and the weight of masked rows change nothing: loss and every
            gradient equal a clean run's exactly, the masked rows' gradients are exactly 0;
  no valid  (top-K) a row without a valid slot behaves like a masked row;
  weight 0  an unmasked row with weight 0 is not masked: a NaN there still gives a NaN loss;
  all       every row masked and every input NaN: loss exactly 0 and every gradient exactly 0.
Every impl gives the same NaN pattern as impl="reference": in the loss, in the rows of per-token gradients,
and in whether the weight and bias gradients hold a NaN. The triton impl runs in a
subprocess under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import torch

import sdft.losses as L

REPO = Path(__file__).resolve().parents[2]
N, H, V, K = 7, 5, 23, 4
UNMASKED, NO_VALID, ZERO_WEIGHT = 3, 5, 4
MASKED = {1: float("nan"), 2: float("inf"), 6: -float("inf")}
"""Rows: the poisoned unmasked row (all its top-K slots valid), a row without a valid top-K slot, the row given
weight 0 in the weight-0 case, the masked rows and the value each gets in the masked case."""
SEQ_IDS = torch.tensor([0, 0, 1, 1, 1, 2, 2])
REDUCTIONS = ("none", "sum", "token_mean", "seq_mean")
NAN, INF = float("nan"), float("inf")


def problem() -> dict:
    """Clean float32 inputs (fixed seed: the triton subprocess and this process build the same problem)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = {
        "student_hidden": randn(N, H), "student_weight": randn(V, H, scale=0.5), "student_bias": randn(V),
        "teacher_hidden": randn(N, H + 2), "teacher_weight": randn(V, H + 2, scale=0.5),
        "student_logits": randn(N, V, scale=2.0), "teacher_logits": randn(N, V, scale=2.0),
        "weights": torch.rand(N, generator=g) + 0.5,
        "student_token_logprobs": randn(N) - 2, "teacher_token_logprobs": randn(N) - 2,
        "sampler_logprobs": randn(N) - 2, "token_ids": torch.randint(0, V, (N,), generator=g),
    }
    teacher_lp = torch.log_softmax(t["teacher_logits"] + randn(N, V), dim=-1)
    topk_logprobs, ids = teacher_lp.topk(K, dim=-1)
    ids[0, 1], ids[2, 3] = -1, V + 2  # invalid slots in rows that are not poisoned
    ids[NO_VALID] = -1
    t["topk_ids"], t["topk_logprobs"] = ids, topk_logprobs
    safe = torch.where(ids >= 0, ids, 0).clamp(max=V - 1)
    t["student_logprobs"] = torch.log_softmax(t["student_logits"], dim=-1).gather(1, safe)
    mask = torch.ones(N, dtype=torch.bool)
    mask[list(MASKED)] = False
    t["mask"] = mask
    return t


@dataclass(frozen=True)
class Fn:
    """One public function under test. `call(t, impl, reduction)` returns its output; `grads` are the inputs it
    differentiates; `bad` maps each input that can be poisoned to the values that make the row undefined."""
    name: str
    call: Callable
    grads: tuple
    bad: dict
    impls: tuple = ("-",)
    masked: bool = True
    topk: bool = False
    linear: tuple = ()  # inputs whose own gradient does not depend on their value (a linear loss)


def _reduced(t, reduction):
    return dict(mask=t["mask"], weights=t["weights"], reduction=reduction, seq_ids=SEQ_IDS)


def _kl_fn(kind):
    return Fn(f"kl_divergence[{kind}]",
              lambda t, impl, r: L.kl_divergence(t["student_logits"], t["teacher_logits"], kind=kind, beta=0.3,
                                                 **_reduced(t, r)),
              ("student_logits",), {"student_logits": (NAN, INF), "teacher_logits": (NAN, INF)})


def _topk_fn(normalize, kind):
    return Fn(f"topk_distill_loss[{normalize},{kind}]",
              lambda t, impl, r: L.topk_distill_loss(t["student_logits"], t["topk_ids"], t["topk_logprobs"],
                                                     normalize=normalize, kind=kind, temperature=0.8,
                                                     **_reduced(t, r)),
              ("student_logits",), {"student_logits": (NAN, INF), "topk_logprobs": (NAN, INF)}, topk=True)


def _from_logprobs_fn(normalize, kind):
    return Fn(f"topk_loss_from_logprobs[{normalize},{kind}]",
              lambda t, impl, r: L.topk_loss_from_logprobs(t["student_logprobs"], t["topk_ids"], t["topk_logprobs"],
                                                           vocab_size=V, normalize=normalize, kind=kind,
                                                           **_reduced(t, r)),
              ("student_logprobs",), {"student_logprobs": (NAN,), "topk_logprobs": (NAN, INF)}, topk=True,
              linear=("student_logprobs",) if (normalize, kind) == ("renormalize", "cross_entropy") else ())


def _sampled_fn(clip):
    return Fn(f"sampled_token_loss[clip={clip}]",
              lambda t, impl, r: L.sampled_token_loss(t["student_token_logprobs"], t["teacher_token_logprobs"],
                                                      t["sampler_logprobs"], clip=clip, **_reduced(t, r)),
              ("student_token_logprobs",),
              {"student_token_logprobs": (NAN,), "teacher_token_logprobs": (NAN,), "sampler_logprobs": (NAN,)})


FUSED_GRADS = ("student_hidden", "student_weight", "student_bias")
IMPLS = ("reference", "chunked", "triton")


def _fused_kl_fn(kind):
    return Fn(f"fused_linear_kl[{kind}]",
              lambda t, impl, r: L.fused_linear_kl(t["student_hidden"], t["student_weight"], t["teacher_hidden"],
                                                   t["teacher_weight"], kind=kind, beta=0.3, temperature=1.2,
                                                   student_bias=t["student_bias"], impl=impl, chunk_size=3,
                                                   **_reduced(t, r)),
              FUSED_GRADS, {"student_hidden": (NAN, INF, -INF), "teacher_hidden": (NAN, INF, -INF)}, impls=IMPLS)


def _fused_topk_fn(normalize, kind):
    return Fn(f"fused_linear_topk_distill_loss[{normalize},{kind}]",
              lambda t, impl, r: L.fused_linear_topk_distill_loss(
                  t["student_hidden"], t["student_weight"], t["topk_ids"], t["topk_logprobs"], normalize=normalize,
                  kind=kind, temperature=0.9, student_bias=t["student_bias"], impl=impl, chunk_size=3,
                  **_reduced(t, r)),
              FUSED_GRADS, {"student_hidden": (NAN, INF, -INF), "topk_logprobs": (NAN, INF)}, impls=IMPLS, topk=True)


TOPK_KINDS = (("renormalize", "cross_entropy"), ("tail", "forward_kl"), ("renormalize", "reverse_kl"))
FUNCTIONS = (
    [_kl_fn(k) for k in ("forward", "reverse", "jsd")]
    + [_topk_fn(*nk) for nk in TOPK_KINDS]
    + [_from_logprobs_fn(*nk) for nk in TOPK_KINDS]
    + [_sampled_fn(c) for c in (None, 2.0)]
    + [_fused_kl_fn(k) for k in ("forward", "reverse", "jsd")]
    + [_fused_topk_fn(*nk) for nk in TOPK_KINDS]
    + [Fn("fused_linear_token_logprobs",
          lambda t, impl, r: L.fused_linear_token_logprobs(t["student_hidden"], t["student_weight"], t["token_ids"],
                                                           bias=t["student_bias"], impl=impl, chunk_size=3),
          FUSED_GRADS, {"student_hidden": (NAN, INF)}, impls=("reference", "chunked"), masked=False),
       Fn("fused_linear_topk",
          lambda t, impl, r: L.fused_linear_topk(t["student_hidden"], t["student_weight"], K,
                                                 bias=t["student_bias"], impl=impl, chunk_size=3)[1],
          (), {"student_hidden": (NAN,)}, impls=IMPLS, masked=False)]
)
BY_NAME = {fn.name: fn for fn in FUNCTIONS}


# ------------------------------------------------------------------------- cases

def cases(impls=("-", "reference", "chunked")) -> list[str]:
    """Case ids 'function|impl|reduction|kind|input|value' for the given impls."""
    out = []
    for fn in FUNCTIONS:
        for impl in fn.impls:
            if impl not in impls:
                continue
            for reduction in (REDUCTIONS if fn.masked else ("-",)):
                for where, values in fn.bad.items():
                    out += [f"{fn.name}|{impl}|{reduction}|unmasked|{where}|{v}" for v in values]
                if not fn.masked:
                    continue
                out.append(f"{fn.name}|{impl}|{reduction}|unmasked|weights|nan")
                out.append(f"{fn.name}|{impl}|{reduction}|masked|all|nan,inf,-inf")
                out.append(f"{fn.name}|{impl}|{reduction}|weight0|{next(iter(fn.bad))}|nan")
                out.append(f"{fn.name}|{impl}|{reduction}|allmasked|all|nan")
                if fn.topk:
                    out.append(f"{fn.name}|{impl}|{reduction}|novalid|all|nan")
    return out


def _entry(t: dict, name: str, row: int):
    """The single entry of input `name` poisoned in row `row`: a logit at a top-K id, slot 0, hidden unit 0."""
    x = t[name]
    if x.dim() == 1:
        return (row,)
    return (row, int(t["topk_ids"][row, 0])) if name == "student_logits" else (row, 0)


def _poisoned(case: str) -> tuple[dict, list]:
    """(inputs, poisoned rows) of a case."""
    fn_name, _, _, kind, where, value = case.split("|")
    fn, t = BY_NAME[fn_name], problem()
    if kind in ("unmasked", "weight0"):
        row = UNMASKED if kind == "unmasked" else ZERO_WEIGHT
        if kind == "weight0":
            t["weights"][row] = 0.0
        t[where][_entry(t, where, row)] = float(value)
        return t, [row]
    if kind == "masked":
        values = MASKED
    else:
        values = {row: float(value) for row in ([NO_VALID] if kind == "novalid" else range(N))}
    if kind == "allmasked":
        t["mask"] = torch.zeros(N, dtype=torch.bool)
    for row, v in values.items():
        for name in list(fn.bad) + ["weights"]:
            t[name][row] = v
    return t, list(values)


@lru_cache(maxsize=None)
def clean_run(fn_name: str, impl: str, reduction: str, kind: str):
    """(output, gradients) on the clean problem (with the weight-0 row, or every row masked, where the case has)."""
    t = problem()
    if kind == "weight0":
        t["weights"][ZERO_WEIGHT] = 0.0
    if kind == "allmasked":
        t["mask"] = torch.zeros(N, dtype=torch.bool)
    return evaluate(BY_NAME[fn_name], t, impl, reduction)


def evaluate(fn: Fn, t: dict, impl: str, reduction: str):
    """(output, {input: gradient}) of one call; a per-token output is differentiated with weights 1..N."""
    t = {name: (x.clone().requires_grad_() if name in fn.grads else x) for name, x in t.items()}
    out = fn.call(t, impl, reduction)
    if not fn.grads:
        return out.detach(), {}
    total = out if out.dim() == 0 else (out * torch.arange(1, out.numel() + 1, dtype=out.dtype)).sum()
    grads = torch.autograd.grad(total, [t[name] for name in fn.grads])
    return out.detach(), dict(zip(fn.grads, grads))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN included."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@lru_cache(maxsize=None)
def check(case: str) -> dict:
    """Run one case; raise AssertionError on a broken contract. Returns the NaN pattern of output and gradients."""
    fn_name, impl, reduction, kind, where, _ = case.split("|")
    fn = BY_NAME[fn_name]
    bad_inputs, rows = _poisoned(case)
    out, grads = evaluate(fn, bad_inputs, impl, reduction)
    clean_out, clean_grads = clean_run(fn_name, impl, reduction, kind)
    assert not clean_out.isnan().any(), "the clean run is not finite"
    row = rows[0]
    others = torch.arange(N) != row
    if kind in ("masked", "novalid"):
        assert _equal(out, clean_out), f"output {out} differs from the clean run {clean_out}"
        for name, g in grads.items():
            assert _equal(g, clean_grads[name]), f"d {name} differs from the clean run"
            if g.shape[0] == N:
                assert torch.all(g[rows] == 0), f"d {name} of the rows taking no part is not exactly 0"
    elif kind == "allmasked":
        assert torch.all(out == 0), f"all-masked output {out} is not exactly 0"
        for name, g in grads.items():
            assert torch.all(g == 0), f"all-masked d {name} is not exactly 0"
    else:
        if out.dim() == 0:
            assert out.isnan(), f"loss {out} is not NaN"
        else:
            assert out[row].isnan().all(), f"output row {row} is {out[row]}, not NaN"
            assert _equal(out[others], clean_out[others]), "the other tokens' outputs changed"
        for name, g in grads.items() if kind == "unmasked" else ():
            per_row = g.shape[0] == N and name not in ("student_weight", "student_bias")
            if not per_row:
                assert g.isnan().any(), f"d {name} has no NaN"
                continue
            if where in fn.linear and name == where:
                assert _equal(g[row], clean_grads[name][row]), f"d {name}: the gradient of a linear loss changed"
            elif name == "student_hidden":
                assert g[row].isnan().all(), f"d {name} of the bad row is {g[row]}, not all NaN"
            else:
                assert g[row].isnan().any(), f"d {name} of the bad row is {g[row]}, without NaN"
            assert _equal(g[others], clean_grads[name][others]), f"d {name} of the other rows changed"
    return {"output": out.isnan().tolist(), **{name: _nan_signature(g) for name, g in grads.items()}}


def _nan_signature(g: torch.Tensor):
    """Which rows of a per-token gradient [N, ...] hold a NaN; for a weight or bias gradient, whether it does.
    (Where exactly the NaNs of a bad row land in a weight gradient depends on the order of operations.)"""
    if g.shape[0] == N:  # V != N: the weight [V, H] and bias [V] gradients are never taken for per-token ones
        return g.reshape(N, -1).isnan().any(dim=1).tolist()
    return bool(g.isnan().any())


# ------------------------------------------------------------------------- pytest side

CPU_CASES = cases()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: a single intra-op thread avoids thread start-up and contention costs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CPU_CASES)
def test_contract(case):
    pattern = check(case)
    fn_name, impl, *rest = case.split("|")
    if impl not in ("-", "reference"):
        reference = check("|".join([fn_name, "reference", *rest]))
        assert pattern == reference, "the NaN pattern differs from impl='reference'"


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan_contract") / "triton.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO)] + [env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.losses.test_nan_contract", str(out)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and out.exists(), f"triton subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


TRITON_CASES = cases(("triton",))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES)
def test_contract_triton_interpreter(triton_results, case):
    result = triton_results[case]
    assert result["ok"], result["error"]
    fn_name, _, *rest = case.split("|")
    assert result["pattern"] == check("|".join([fn_name, "reference", *rest])), \
        "the NaN pattern differs from impl='reference'"


def _run_triton_cases(out_path: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for case in TRITON_CASES:
        try:
            results[case] = {"ok": True, "error": "", "pattern": check(case)}
        except Exception:  # report every case, keep going
            results[case] = {"ok": False, "error": traceback.format_exc(limit=3), "pattern": None}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _run_triton_cases(sys.argv[1])
