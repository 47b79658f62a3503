"""The goals of the fused losses on a GPU, checked against rows of `sdft.bench.loss_speed`.

At N=8192, H=4096, V=151936 in bf16 (REFERENCE.md section 8: one 2NHV GEMM is 10.2 TFLOP): forward KL
without the weight gradient <= 50 ms and with it <= 70 ms, extra memory <= 2.5 GB, at least 1.5x faster
than Liger-Kernel's fused linear JSD loss at equal settings (both computing the weight gradient), top-K=20
distillation (no weight gradient) <= 40 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GOALS_SETTING = "the goals hold for an H100/H200-class GPU at N=8192, H=4096, V=151936 in bf16"


@dataclass(frozen=True)
class Goal:
    """`metric` of the row (loss label, mode) of a path: "ms", "extra_gb" or "liger_speedup" (Liger's time
    over the path's, on the same case, loss and mode); met when value <= limit ("max") or >= limit ("min")."""
    name: str
    loss: str
    mode: str
    metric: str
    limit: float
    sense: str = "max"


GOALS = (
    Goal("forward KL, no weight gradient", "kl", "lora", "ms", 50.0),
    Goal("forward KL, with weight gradient", "kl", "full", "ms", 70.0),
    Goal("extra memory, forward KL without weight gradient", "kl", "lora", "extra_gb", 2.5),
    Goal("extra memory, forward KL with weight gradient", "kl", "full", "extra_gb", 2.5),
    Goal("speed-up over Liger, forward KL with weight gradient", "kl", "full", "liger_speedup", 1.5, "min"),
    Goal("speed-up over Liger, JSD(0.5) with weight gradient", "jsd", "full", "liger_speedup", 1.5, "min"),
    Goal("top-K=20 distillation, no weight gradient", "topk", "lora", "ms", 40.0),
)
UNITS = {"ms": " ms", "extra_gb": " GB", "liger_speedup": "x"}


def _value(goal: Goal, row: dict, liger: dict | None) -> tuple[float | None, str]:
    if row.get("ms") is None:
        return None, f"{row['impl']} not measured: {row.get('note') or 'no time'}"
    if goal.metric == "ms":
        return row["ms"], ""
    if goal.metric == "extra_gb":
        if row.get("extra_gib") is None:
            return None, "memory is measured on CUDA only"
        return row["extra_gib"] * 2**30 / GB, ""
    if liger is None or liger.get("ms") is None:
        return None, "Liger not measured" + (f": {liger['note']}" if liger and liger.get("note") else "")
    return liger["ms"] / row["ms"], ""


def evaluate(rows: list[dict], case: str, impls=("chunked", "triton")) -> list[dict]:
    """One result per goal and path of `impls` at `case`: {goal, impl, case, value, limit, sense, unit, met
    (True, False, or None when not measured), note}."""
    results = []
    for goal in GOALS:
        matching = {r["impl"]: r for r in rows if r["case"] == case and r["loss"] == goal.loss
                    and r["mode"] == goal.mode}
        for impl in impls:
            row = matching.get(impl)
            if row is None:
                value, note = None, f"{goal.loss} ({goal.mode}) was not run"
            else:
                value, note = _value(goal, row, matching.get("liger"))
            met = None if value is None else (value <= goal.limit if goal.sense == "max" else value >= goal.limit)
            results.append({"goal": goal.name, "impl": impl, "case": case, "value": value, "limit": goal.limit,
                            "sense": goal.sense, "unit": UNITS[goal.metric], "met": met, "note": note})
    return results


def format_results(results: list[dict]) -> str:
    lines = ["| goal | path | measured | goal | met |", "|---|---|---:|---:|---|"]
    for r in results:
        measured = "-" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
        limit = ("<= " if r["sense"] == "max" else ">= ") + f"{r['limit']:g}{r['unit']}"
        met = {True: "yes", False: "**no**", None: f"not measured ({r['note']})"}[r["met"]]
        lines.append(f"| {r['goal']} | {r['impl']} | {measured} | {limit} | {met} |")
    return "\n".join(lines)
