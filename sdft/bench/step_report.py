"""Results of step benchmarks: medians over the timed steps, step-time ratios, and a markdown table with one
row per metric and one column per trainer."""
from __future__ import annotations

import statistics

COLUMNS = ("sdft", "sft", "sft_len", "trl")
COLUMN_TITLES = {"sdft": "SDFT (sdft)", "sft": "SFT (demonstration)", "sft_len": "SFT (same length)",
                 "trl": "TRL SDFTTrainer"}
TIME_ROWS = (  # (key, title, format)
    ("sample_s", "sampling (s)", "{:.2f}"),
    ("teacher_s", "teacher forward (s)", "{:.2f}"),
    ("student_s", "student forward+backward (s)", "{:.2f}"),
    ("optimizer_s", "optimizer (s)", "{:.3f}"),
    ("total_s", "total step (s)", "{:.2f}"),
    ("completion_tokens", "completion (SFT: target) tokens per step", "{:.0f}"),
    ("processed_tokens", "tokens processed per step", "{:.0f}"),
    ("completion_tok_s", "completion (SFT: target) tokens/s", "{:.1f}"),
    ("processed_tok_s", "tokens processed/s", "{:.1f}"),
)
ROWS = TIME_ROWS + (("peak_rise_mib", "peak RSS rise over the loaded model (MiB)", "{:.0f}"),)
GPU_ROWS = TIME_ROWS + (
    ("resident_gib", "GPU memory held between steps (GiB)", "{:.2f}"),
    ("peak_gib", "peak GPU memory in a step (GiB)", "{:.2f}"),
)
MEDIAN_KEYS = ("sample_s", "teacher_s", "student_s", "optimizer_s", "total_s", "completion_tokens", "processed_tokens")


def summarize(steps: list[dict], memory: dict) -> dict:
    """Medians over the timed steps (throughputs: medians of the per-step rates) and the memory figures."""
    out = {key: statistics.median(s[key] for s in steps) for key in MEDIAN_KEYS}
    out["completion_tok_s"] = statistics.median(s["completion_tokens"] / s["total_s"] for s in steps)
    out["processed_tok_s"] = statistics.median(s["processed_tokens"] / s["total_s"] for s in steps)
    for key in ("peak_rise_mib", "resident_gib", "peak_gib"):
        out[key] = memory.get(key, float("nan"))
    return out


def format_table(summaries: dict[str, dict], notes: dict[str, str], rows=ROWS) -> str:
    """A markdown table: one row per metric, one column per trainer ("-": not measured separately,
    "n/a": the column did not run, see its note)."""
    columns = [c for c in COLUMNS if c in summaries or c in notes]
    lines = ["| | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key, title, fmt in rows:
        cells = []
        for c in columns:
            value = summaries.get(c, {}).get(key)
            if c not in summaries:
                cells.append("n/a")
            elif value is None or value != value:
                cells.append("-")
            else:
                cells.append(fmt.format(value))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_ratios(steps: dict[str, list[dict]], numerator: str, denominator: str) -> list[float]:
    """Step-time ratio numerator / denominator of every timed round that both columns completed."""
    pairs = zip(steps.get(numerator, []), steps.get(denominator, []))
    return [a["total_s"] / b["total_s"] for a, b in pairs]


def ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """Step-time ratios of the median steps (and TRL's per completion token)."""
    out, sdft = {}, summaries.get("sdft")
    if sdft is None:
        return out
    for column in ("sft", "sft_len"):
        if column in summaries:
            out[f"sdft/{column}"] = sdft["total_s"] / summaries[column]["total_s"]
    if "trl" in summaries:
        out["trl/sdft"] = summaries["trl"]["total_s"] / sdft["total_s"]
        out["trl/sdft per completion token"] = sdft["completion_tok_s"] / summaries["trl"]["completion_tok_s"]
    return out
