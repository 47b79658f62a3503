"""Smoke tests of scripts/bench_step.py (sdft.bench.step_bench) on the tiny random Llama: 1 timed step, 2
prompts, 4 new tokens."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sdft.bench.availability import TRL_MISSING
from sdft.bench.step_report import COLUMN_TITLES, ROWS
from sdft.bench.trl_column import trl_teacher_template

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(model_dir, *extra):
    return ["--model", model_dir, "--prompts", "2", "--new-tokens", "4", "--repeats", "1", *extra]


def _check_table(out, columns):
    lines = out["table"].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == [""] + [COLUMN_TITLES[c] for c in columns]
    titles = [line.split("|")[1].strip() for line in lines[2:]]
    assert titles == [title for _, title, _ in ROWS]
    for column in columns:
        summary = out["summaries"][column]
        assert summary["total_s"] > 0 and summary["student_s"] > 0
        assert summary["completion_tokens"] > 0 and summary["processed_tok_s"] > 0
        assert summary["peak_rise_mib"] == summary["peak_rise_mib"]  # not NaN
        assert len(out["steps"][column]) == 1


def test_in_process_without_trl(bench_step, tiny_model_dir, capsys):
    out = bench_step.main(_argv(tiny_model_dir, "--in-process", "--skip-trl"))
    _check_table(out, ["sdft", "sft", "sft_len"])
    sdft = out["summaries"]["sdft"]
    assert sdft["sample_s"] > 0 and sdft["teacher_s"] > 0 and sdft["optimizer_s"] > 0
    assert sdft["completion_tokens"] <= 2 * 4
    # SFT on targets as long as the SDFT step's completions, prompt by prompt
    lengths = out["steps"]["sdft"][0]["completion_lengths"]
    assert len(lengths) == 2 and sum(lengths) == sdft["completion_tokens"]
    assert out["summaries"]["sft_len"]["completion_tokens"] == sum(max(1, n) for n in lengths)
    assert set(out["ratios"]) == {"sdft/sft", "sdft/sft_len"} and all(r > 0 for r in out["ratios"].values())
    assert out["round_ratios"]["sdft/sft_len"] == [pytest.approx(out["ratios"]["sdft/sft_len"])]
    printed = capsys.readouterr().out
    assert out["table"] in printed and "SDFT / SFT step time" in printed


def test_trl_missing_is_reported(bench_step, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)
    out = bench_step.main(_argv(tiny_model_dir, "--in-process", "--columns", "sft,trl"))
    assert out["notes"] == {"trl": TRL_MISSING}
    assert TRL_MISSING in capsys.readouterr().out
    lines = out["table"].splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["", "SFT (demonstration)", "TRL SDFTTrainer"]
    assert all(line.endswith("| n/a |") for line in lines[2:])
    assert out["summaries"]["sft"]["total_s"] > 0 and "trl" not in out["summaries"]


def test_trl_column(bench_step, tiny_model_dir):
    pytest.importorskip("trl.experimental.sdft")
    out = bench_step.main(_argv(tiny_model_dir, "--in-process", "--columns", "sdft,trl"))
    assert not out["notes"], out["notes"]
    _check_table(out, ["sdft", "trl"])
    assert out["summaries"]["trl"]["sample_s"] > 0
    assert out["ratios"]["trl/sdft"] > 0


def test_worker_subprocess(bench_step, tiny_model_dir, tmp_path):
    json_path = tmp_path / "bench.json"
    out = bench_step.main(_argv(tiny_model_dir, "--columns", "sft", "--threads", "1", "--json", str(json_path)))
    _check_table(out, ["sft"])
    assert out["memory"]["sft"]["loaded_rss_mib"] > 0
    assert json.loads(json_path.read_text())["table"] == out["table"]


def test_trl_teacher_template_matches_sdft():
    from sdft.prompts import render_teacher_content

    template = trl_teacher_template("official")
    assert template.format(prompt="Q?", privileged_context="A.") == render_teacher_content("Q?", "A.", "official")
