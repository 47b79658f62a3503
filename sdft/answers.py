"""Answer concentration: does a student name one answer far more often than it is right?

For a benchmark scored by `contains` (a list of accepted answers per item), the candidate answers are the
union of all items' accepted answers. For each candidate `a`, over the items:

    named(a)       = #items whose completion contains a (case-insensitive, as the verifier reads it)
    right(a)       = #items that accept a
    named_wrong(a) = #items whose completion contains a although they do not accept it

A student that learned the skill names `a` about as often as `a` is right; one that learned a frequent
answer word instead ("pup", "calf") names it where it does not fit: named(a) well above right(a).

    python -m sdft.answers <run>/predictions/heldout.jsonl [more.jsonl ...] [--top 5]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class AnswerCount:
    answer: str
    named: int
    right: int
    named_wrong: int

    @property
    def ratio(self) -> float:
        """named / right (inf when the answer is never right but named)."""
        return self.named / self.right if self.right else (float("inf") if self.named else 0.0)


def answer_counts(rows: Iterable[Mapping], where: str = "predictions") -> list[AnswerCount]:
    """One AnswerCount per candidate answer named at least once, most named first.

    rows: prediction rows {"completion": str, "reference": [accepted answers]} (what `sdft.evaluation.evaluate`
    saves for a `contains` benchmark)."""
    items = []
    for index, row in enumerate(rows, 1):
        reference = row.get("reference")
        if not (isinstance(reference, list) and reference and all(isinstance(r, str) for r in reference)):
            raise ValueError(f"{where}: row {index}: 'reference' must be a non-empty list of accepted answers "
                             f"(a 'contains' benchmark), got {reference!r}")
        items.append((str(row.get("completion", "")).lower(), {r.lower() for r in reference}))
    candidates = sorted({answer for _, accepted in items for answer in accepted})
    counts = []
    for answer in candidates:
        named = [answer in completion for completion, _ in items]
        right = [answer in accepted for _, accepted in items]
        if any(named):
            counts.append(AnswerCount(answer=answer, named=sum(named), right=sum(right),
                                      named_wrong=sum(n and not r for n, r in zip(named, right))))
    return sorted(counts, key=lambda c: (-c.named, c.answer))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", help="prediction files (JSONL) of contains-scored benchmarks")
    parser.add_argument("--top", type=int, default=5, help="answers shown per file (most named first)")
    args = parser.parse_args(argv)
    from sdft.io import read_jsonl

    for path in args.predictions:
        counts = answer_counts(read_jsonl(path), where=str(path))
        shown = "; ".join(f"{c.answer} named {c.named} / right {c.right} (wrong {c.named_wrong}) x{c.ratio:.1f}"
                          for c in counts[:args.top])
        print(f"{path}: {shown or 'no accepted answer is named'}")


if __name__ == "__main__":
    main()
