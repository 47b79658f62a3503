"""Command-line selections of the experiment scripts: `key=a,b,c` arguments."""
from __future__ import annotations

from typing import Sequence


def parse_selection(arguments: Sequence[str], *, allowed: Sequence[str]) -> dict[str, list[str]]:
    """{"methods": ["sft", "sdft_topk"], ...} from ["methods=sft,sdft_topk", ...]; unknown keys are errors."""
    out: dict[str, list[str]] = {}
    for text in arguments:
        key, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"argument {text!r} is not of the form key=a,b (allowed keys: {', '.join(allowed)})")
        if key not in allowed:
            raise ValueError(f"argument {text!r}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        out[key] = [v.strip() for v in value.split(",") if v.strip()]
    return out
