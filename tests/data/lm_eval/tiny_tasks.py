"""Loads the documents of the local lm-eval test tasks from the JSONL files beside this file."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file: str, **_ignored):
    """{"test": a datasets.Dataset of the rows of <this folder>/<file>}."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (HERE / file).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": Dataset.from_list(rows)}
