"""The prepared GPU check (scripts/gpu_check.py, sdft.bench.gpu_check) run in its --tiny mode on the CPU:
the results it writes, its goal verdicts, its time budgets and how it records failures."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.bench import gpu_check, loss_accuracy
from sdft.bench.availability import LIGER_MISSING
from sdft.bench.budget import Budget
from sdft.bench.goals import GOALS, evaluate

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """One `scripts/gpu_check.py --tiny` run: (exit status, printed output, JSON results, markdown)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=1200)
    results = json.loads((out / gpu_check.JSON_NAME).read_text())
    return done, results, (out / gpu_check.MARKDOWN_NAME).read_text(), (out / gpu_check.LOG_NAME).read_text()


def test_tiny_run_succeeds_and_writes_its_files(tiny_check):
    done, results, markdown, log = tiny_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results["failures"] == []
    assert {p: results["parts"][p]["status"] for p in gpu_check.PARTS} == {p: "ok" for p in gpu_check.PARTS}
    for title in ("## 1. Accuracy", "## 2. Loss benchmark", "## 3. One SDFT step", "## Failures"):
        assert title in markdown
    assert "gpu_check: no failures" in log and "gpu_check: no failures" in done.stdout
    assert results["environment"]["device"] == "CPU"


def test_accuracy_part_checks_every_loss_against_float64_truth(tiny_check):
    _, results, markdown, _ = tiny_check
    part = results["parts"]["accuracy"]
    assert part["impls"] == (["chunked", "triton"] if HAS_TRITON else ["chunked"])
    rows = part["rows"]
    assert {r["loss"] for r in rows} == set(loss_accuracy.item_names())
    fused = [r for r in rows if r["path"] != "naive"]
    assert {r["path"] for r in fused} == set(part["impls"]) and all(r["passed"] for r in fused)
    assert all(r["loss_err"] < 1e-5 for r in fused)  # fp32 softmax from exact products
    naive = [r for r in rows if r["path"] == "naive" and r["dh_err"] is not None]
    assert naive and all(r["dh_err"] > 1e-3 for r in naive)  # bf16 logits cost naive PyTorch accuracy
    for row in rows:
        assert loss_accuracy.format_row(row) in markdown


def test_loss_part_measures_every_path_and_the_paths_agree(tiny_check):
    _, results, markdown, _ = tiny_check
    part = results["parts"]["losses"]
    rows = {(r["loss"], r["mode"], r["impl"]): r for r in part["rows"]}
    specs = [(s.label, s.mode) for s in gpu_check.LOSS_SPECS]
    ours = ["naive", "chunked"] + (["triton"] if HAS_TRITON else [])
    for label, mode in specs:
        for impl in ours:
            row = rows[(label, mode, impl)]
            assert row["ms"] > 0 and row["floor_fraction"] > 0, row
            if label != "teacher_topk":  # the same token-mean loss on every path (naive: bf16 logits)
                assert row["value"] == pytest.approx(rows[(label, mode, "chunked")]["value"], rel=2e-2)
    liger = [r for r in part["rows"] if r["impl"] == "liger"]
    assert {(r["loss"], r["mode"]) for r in liger} == {s for s in specs if s[0] != "teacher_topk"}
    assert rows[("topk", "lora", "liger")]["note"] == "no top-K loss in Liger"
    for r in liger:
        if r["loss"] != "topk":
            if HAS_LIGER:
                assert r["value"] == pytest.approx(rows[(r["loss"], r["mode"], "chunked")]["value"], rel=5e-2)
            else:
                assert r["ms"] is None and r["note"] == LIGER_MISSING
    assert "| tiny | kl | full | chunked |" in markdown


def test_goal_verdicts_follow_the_measured_rows(tiny_check):
    _, results, markdown, _ = tiny_check
    part = results["parts"]["losses"]
    goals = part["goals"]
    assert [(g["goal"], g["impl"]) for g in goals] == [(goal.name, impl) for goal in GOALS
                                                        for impl in ("chunked", "triton")]
    rows = {(r["loss"], r["mode"], r["impl"]): r for r in part["rows"]}
    for goal, result in zip((g for g in GOALS for _ in range(2)), goals):
        row = rows[(goal.loss, goal.mode, result["impl"])]
        if goal.metric == "ms" and row["ms"] is not None:
            assert result["value"] == row["ms"] and result["met"] == (row["ms"] <= goal.limit)
        if goal.metric == "extra_gb":  # CUDA only
            assert result["met"] is None and "CUDA" in result["note"]
    assert "Goals, at case tiny" in markdown


def test_step_part_trains_sdft_and_sft_on_the_same_token_counts(tiny_check):
    _, results, markdown, _ = tiny_check
    part = results["parts"]["steps"]
    assert part["model"]["parameters"] == gpu_check.TINY_QWEN2.parameters()
    assert set(part["modes"]) == {"lora", "full"}
    prompts, new_tokens = part["settings"]["prompts"], part["settings"]["new_tokens"]
    for mode, result in part["modes"].items():
        sdft, sft = result["summaries"]["sdft"], result["summaries"]["sft_len"]
        assert result["equal_tokens"] is True
        assert sdft["completion_tokens"] == sft["completion_tokens"] <= prompts * new_tokens
        assert sdft["sample_s"] > 0 and sdft["teacher_s"] > 0 and sdft["student_s"] > 0 and sft["student_s"] > 0
        assert result["ratio"] == pytest.approx(sdft["total_s"] / sft["total_s"])
        assert len(result["steps"]["sdft"]) == len(result["steps"]["sft_len"]) == part["repeats"]
        assert result["table"] in markdown
    assert "### LoRA" in markdown and "### Full fine-tuning" in markdown


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(plan, budget, log):
        raise RuntimeError("kernel exploded")

    ran = []
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "accuracy", broken)
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "steps", lambda plan, budget, log: (ran.append(1) or {}, []))
    status = gpu_check.run_check(gpu_check.tiny_plan(), tmp_path, parts=["accuracy", "steps"], echo=lambda line: None)
    assert status == 1 and ran == [1]
    results = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert results["parts"]["accuracy"]["status"] == "failed"
    assert "RuntimeError: kernel exploded" in results["parts"]["accuracy"]["traceback"]
    assert results["parts"]["steps"]["status"] == "ok"
    assert results["failures"] == ["accuracy: RuntimeError: kernel exploded"]
    assert "- accuracy: RuntimeError: kernel exploded" in (tmp_path / gpu_check.MARKDOWN_NAME).read_text()


def test_what_does_not_fit_the_budget_is_skipped_and_says_so(tmp_path):
    plan = gpu_check.with_budgets(gpu_check.tiny_plan(), {"accuracy": 0.0}, None)
    status = gpu_check.run_check(plan, tmp_path, parts=["accuracy"], echo=lambda line: None)
    assert status == 0  # a skip is not a failure
    rows = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())["parts"]["accuracy"]["rows"]
    assert [r["loss"] for r in rows] == loss_accuracy.item_names()
    assert all(r["path"] == "-" and r["note"].startswith("skipped: 0 s left of the 0 s budget") for r in rows)
    with pytest.raises(ValueError, match="unknown part"):
        gpu_check.with_budgets(plan, {"speed": 1.0}, None)


def test_budget_expects_the_last_duration_of_a_kind():
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    assert budget.allows("mode")
    budget.record("mode", 60.0)
    now[0] = 30.0
    assert budget.allows("mode") and budget.allows("other")  # 70 s left >= 60 s
    now[0] = 50.0
    assert not budget.allows("mode") and budget.allows("other")
    assert budget.skip_note("mode") == "skipped: 50 s left of the 100 s budget, an item of this kind took 60 s"
    now[0] = 101.0
    assert not budget.allows("other")


def test_goals_compare_against_liger_at_equal_settings():
    rows = [{"case": "c", "loss": "kl", "mode": "full", "impl": "triton", "ms": 40.0, "extra_gib": 1.0, "note": ""},
            {"case": "c", "loss": "kl", "mode": "full", "impl": "liger", "ms": 100.0, "extra_gib": 3.0, "note": ""},
            {"case": "c", "loss": "kl", "mode": "lora", "impl": "triton", "ms": 55.0, "extra_gib": 3.0, "note": ""}]
    got = {(r["goal"], r["impl"]): r for r in evaluate(rows, "c", impls=("triton",))}
    assert got[("speed-up over Liger, forward KL with weight gradient", "triton")]["value"] == 2.5
    assert got[("speed-up over Liger, forward KL with weight gradient", "triton")]["met"] is True
    assert got[("forward KL, with weight gradient", "triton")]["met"] is True
    assert got[("forward KL, no weight gradient", "triton")]["met"] is False
    assert got[("extra memory, forward KL without weight gradient", "triton")]["value"] == pytest.approx(
        3 * 2**30 / 1e9)
    assert got[("extra memory, forward KL without weight gradient", "triton")]["met"] is False
    assert got[("top-K=20 distillation, no weight gradient", "triton")]["met"] is None
