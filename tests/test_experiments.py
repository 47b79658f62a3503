"""The experiment runners: specs and presets, task splits, resumable cells, ablation and continual-learning
reports, run end to end on a tiny model (real training, evaluation, export and reload)."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdft.experiments.ablation import run_ablation
from sdft.experiments.cells import RESULT_FILE
from sdft.experiments.cli import parse_selection
from sdft.experiments.continual import run_continual
from sdft.experiments.spec import load_spec
from sdft.experiments.splits import prepare_task
from sdft.logs import read_metrics
from sdft.stats import paired_ratio_ci
from tests.test_data import save_rows, tooluse_row

APIS = ["Alpha", "Beta", "Gamma", "Delta"]


def _write_tasks(folder: Path) -> tuple[Path, Path]:
    tool = [tooluse_row(api, f"do thing {i} with {api}", [(f"get{api}", {"n": i})], None)
            for api in APIS for i in range(3)]
    system = {"role": "system", "content": "Answer with <answer>X</answer>."}
    science = [{"prompt": [system, {"role": "user", "content": f"Question {i}? A: a B: b C: c D: d"}],
                "answer": "ABCD"[i % 4]} for i in range(10)]
    return save_rows(folder / "tool", tool), save_rows(folder / "sci", science)


def _write_spec(tmp_path: Path, model_dir: str, kind: str) -> Path:
    tool, sci = _write_tasks(tmp_path)
    run_config = tmp_path / "run.yaml"
    run_config.write_text("\n".join([
        f"model: {{name: {model_dir}}}",
        "student: {mode: lora, lora_rank: 4}",
        "teacher: {mode: static}",
        "objective: {skip_first_n_tokens: 1}",
        "optim: {lr: 1.0e-3, schedule: constant, warmup_ratio: 0.0, batch_size: 2, micro_batch_size: 2, max_steps: 1}",
        "generation: {max_new_tokens: 6, batch_size: 4}",
        "data: {kind: tooluse, path: unused}",
        "logging: {tensorboard: false, progress: false}",
        "checkpoint: {every: 1}",
    ]) + "\n")
    tasks = (f"tasks:\n"
             f"  tool: {{title: Tool, kind: tooluse, path: {tool}, split: api, test_fraction: 0.25, "
             f"benchmark: {{max_new_tokens: 4}}, also_score: [actions]}}\n"
             f"  sci: {{title: Sci, kind: science, path: {sci}, split: random, test_fraction: 0.3, "
             f"benchmark: {{max_new_tokens: 3, mcq_mode: lenient}}}}\n")
    if kind == "ablation":
        body = ("name: abl\ntrain_task: tool\nreference: topk\ncolumns: {kl: KL, ema: EMA}\n" + tasks +
                "methods:\n"
                "  topk: {kl: Top-K, ema: 'no', overrides: [objective.targets=topk, objective.topk.k=5]}\n"
                "  full_ema: {kl: Full, ema: 'yes', overrides: [objective.targets=full, teacher.mode=ema]}\n"
                "  sft: {kl: SFT, ema: n/a, overrides: [algorithm=sft]}\n"
                "seeds: [0, 1]\n"
                "presets:\n  small: {methods: [topk, sft], notes: [small preset]}\n")
    else:
        facts = tmp_path / "facts"
        facts.mkdir()
        (facts / "tasks.jsonl").write_text("".join(json.dumps(
            {"task_id": f"f{i}", "instruction": f"Say {word}.", "verifier": {"kind": "in_process", "fn_name": "contains",
                                                                         "expected": [word]}}) + "\n"
            for i, word in enumerate(["yes", "no", "maybe", "blue"])))
        tasks += f"  facts: {{title: Facts, kind: tasks, test_path: {facts}, benchmark: {{max_new_tokens: 3}}}}\n"
        body = ("name: cl\nstages: [tool, sci]\nlearning_rates: [1.0e-3]\nreference: sft\n" + tasks +
                "methods:\n"
                "  sft: {label: SFT, overrides: [algorithm=sft]}\n"
                "  sdft_topk: {label: SDFT top-K, overrides: [objective.targets=topk, objective.topk.k=5]}\n"
                "seeds: [0]\n")
    spec = tmp_path / f"{kind}.yaml"
    spec.write_text(f"config: {run_config}\n" + body)
    return spec


class CountingTrain:
    def __init__(self):
        from sdft.runner import train_from_config
        self.inner, self.calls = train_from_config, []

    def __call__(self, config, **kwargs):
        self.calls.append(config.run_name)
        return self.inner(config, **kwargs)


def test_ablation_end_to_end_table_and_resume(tmp_path, tiny_model_dir):
    spec = load_spec(_write_spec(tmp_path, tiny_model_dir, "ablation"), "small")
    assert spec.name == "abl_small" and list(spec.methods) == ["topk", "sft"] and spec.notes == ["small preset"]
    train, lines = CountingTrain(), []
    table = run_ablation(spec, results_dir=tmp_path / "results", train_fn=train, log=lines.append, command="cmd")
    assert train.calls == ["base", "topk_seed0", "topk_seed1", "sft_seed0", "sft_seed1"]
    root = tmp_path / "results" / "abl_small"
    text = table.read_text()
    for needle in ("| KL | EMA | Tool | Sci |", "| Base model | n/a |", "| Top-K | no |", "| SFT | n/a |",
                   "Paired difference vs Top-K / no", "small preset", "split by 'api'", "`cmd`",
                   "| KL | EMA | Tool (actions) |"):
        assert needle in text, needle
    assert (root / "bars.png").stat().st_size > 0
    result = json.loads((root / "cells" / "sft_seed1" / RESULT_FILE).read_text())
    assert result["meta"] == {"method": "sft", "seed": 1} and set(result["scores"]) == {"tool", "sci"}
    assert len(result["scores"]["tool"]) == 3 and len(result["scores"]["sci"]) == 3  # 1 of 4 APIs, 30% of 10
    assert any(line.startswith("[cell 2/5] topk_seed0") and "time left" in line for line in lines)
    seed0 = (root / "cells" / "topk_seed0" / "config.yaml").read_text()
    assert "seed: 0" in seed0 and "resume: true" in seed0 and "k: 5" in seed0
    assert "before_training: false" in seed0

    # a rerun trains nothing; a removed result reruns only that cell (resuming from its checkpoint)
    again = CountingTrain()
    run_ablation(spec, results_dir=tmp_path / "results", train_fn=again, log=lines.append)
    assert again.calls == []
    (root / "cells" / "sft_seed0" / RESULT_FILE).unlink()
    run_ablation(spec, results_dir=tmp_path / "results", train_fn=again, log=lines.append)
    assert again.calls == ["sft_seed0"]
    assert table.read_text().count("| SFT | n/a |") == 5  # accuracy, per seed, vs reference, vs base, secondary
    # a changed spec is not silently mixed with finished cells
    changed = dataclasses.replace(spec, overrides=["optim.lr=0.5"])
    with pytest.raises(ValueError, match=r"cell base: .* different config \(optim.lr: 0.001 -> 0.5\)"):
        run_ablation(changed, results_dir=tmp_path / "results", train_fn=again, log=lines.append)


def _with_benchmark(spec, task, **fields):
    """`spec` with fields of one task's benchmark replaced (an eval-only change of every cell)."""
    tasks = dict(spec.tasks)
    tasks[task] = dataclasses.replace(tasks[task], benchmark={**tasks[task].benchmark, **fields})
    return dataclasses.replace(spec, tasks=tasks)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _no_training_step(monkeypatch):
    """Make any optimizer step of a run fail the test."""
    def refuse(config, **kwargs):
        def step(backend, batch, step):
            raise AssertionError(f"{config.run_name}: a training step ran (step {step})")
        return step
    monkeypatch.setattr("sdft.runner.sdft_step_fn", refuse)
    monkeypatch.setattr("sdft.runner.sft_step_fn", refuse)


def test_changed_eval_settings_reevaluate_finished_cells_without_training(tmp_path, tiny_model_dir, monkeypatch):
    spec = load_spec(_write_spec(tmp_path, tiny_model_dir, "ablation"), "small")
    results = tmp_path / "results"
    run_ablation(spec, results_dir=results, seeds=[0], log=lambda _: None)
    cells = results / "abl_small" / "cells"
    names = ["base", "topk_seed0", "sft_seed0"]
    before = {name: {"checkpoints": _files(cells / name / "checkpoints"),
                     "metrics": read_metrics(cells / name / "metrics.jsonl"),
                     "result": (cells / name / RESULT_FILE).read_text()} for name in names}
    predictions = {"topk_seed0": "sci.jsonl", "base": "sci.before.jsonl"}  # the base cell evaluates before training
    old_sci = {name: _predictions(cells / name / "predictions" / file) for name, file in predictions.items()}
    assert before["base"]["checkpoints"] == {}  # the base cell is only evaluated: no checkpoint

    _no_training_step(monkeypatch)
    longer = _with_benchmark(spec, "sci", max_new_tokens=8)
    train, lines = CountingTrain(), []
    table = run_ablation(longer, results_dir=results, seeds=[0], train_fn=train, log=lines.append)
    assert train.calls == names
    assert "3 finished cell(s) to re-evaluate (no training): eval settings changed" in lines
    assert any(line.startswith("[cell 2/3] topk_seed0: re-evaluated from its final checkpoint") and
               "eval.benchmarks[sci].max_new_tokens: 3 -> 8" in line and "cell.previous.json" in line
               for line in lines), lines
    for name in names:
        folder = cells / name
        assert _files(folder / "checkpoints") == before[name]["checkpoints"]  # no step, nothing re-saved
        assert (folder / "cell.previous.json").read_text() == before[name]["result"]
        assert "max_new_tokens: 3" in (folder / "config.previous.yaml").read_text()
        assert "max_new_tokens: 8" in (folder / "config.yaml").read_text()
        if name != "base":  # the base cell stops before the final evaluation and writes no summary
            assert "max_new_tokens: 8" in (folder / "summary.md").read_text()
        rows = read_metrics(folder / "metrics.jsonl")
        old_rows = before[name]["metrics"]
        assert [r for r in rows if r["split"] == "train"] == [r for r in old_rows if r["split"] == "train"]
        assert sorted((r["step"], r["split"]) for r in rows) == sorted((r["step"], r["split"]) for r in old_rows)
        result = json.loads((folder / RESULT_FILE).read_text())
        assert result["reevaluated_s"] > 0
        assert result["wall_s"] == json.loads(before[name]["result"])["wall_s"]
    for name, file in predictions.items():  # greedy: the 8-token completions extend the 3-token ones
        new_sci, old = _predictions(cells / name / "predictions" / file), old_sci[name]
        assert [r["id"] for r in new_sci] == [r["id"] for r in old]
        assert all(a["completion"].startswith(b["completion"]) for a, b in zip(new_sci, old))
        assert sum(len(r["completion"]) for r in new_sci) > sum(len(r["completion"]) for r in old)
    assert "re-evaluated without training (eval settings changed): 3 cell(s)" in table.read_text()

    # unchanged settings: nothing runs; a second re-evaluation keeps both earlier results
    again = CountingTrain()
    run_ablation(longer, results_dir=results, seeds=[0], train_fn=again, log=lambda _: None)
    assert again.calls == []
    run_ablation(_with_benchmark(spec, "sci", max_new_tokens=5), results_dir=results, seeds=[0], train_fn=again,
                 log=lambda _: None)
    assert again.calls == names
    assert (cells / "sft_seed0" / "cell.previous.2.json").is_file()
    assert "max_new_tokens: 8" in (cells / "sft_seed0" / "config.previous.2.yaml").read_text()
    # a change of a training key is still refused, with or without eval changes beside it
    changed = dataclasses.replace(longer, overrides=["optim.lr=0.5"])
    with pytest.raises(ValueError, match=r"cell base: .* different config \(optim.lr: 0.001 -> 0.5\); only the "
                                         r"eval.\* keys may change"):
        run_ablation(changed, results_dir=results, seeds=[0], train_fn=again, log=lambda _: None)
    # a finished cell without its checkpoints cannot be re-evaluated (it would train again)
    shutil.rmtree(cells / "sft_seed0" / "checkpoints")
    with pytest.raises(ValueError, match=r"cell sft_seed0: its eval settings changed \(eval.benchmarks\[sci\]."
                                         r"max_new_tokens: 5 -> 4\) but .* holds no checkpoint"):
        run_ablation(_with_benchmark(spec, "sci", max_new_tokens=4), results_dir=results, seeds=[0], train_fn=again,
                     log=lambda _: None)


def test_continual_end_to_end_exports_stage_one_and_reports_retention(tmp_path, tiny_model_dir, monkeypatch):
    spec = load_spec(_write_spec(tmp_path, tiny_model_dir, "continual"))
    train = CountingTrain()
    tables = run_continual(spec, results_dir=tmp_path / "results", train_fn=train, log=lambda _: None)
    names = ["base", "s1_sft_lr0.001_seed0", "s1_sdft_topk_lr0.001_seed0", "s2_sft_lr0.001_seed0",
             "s2_sdft_topk_lr0.001_seed0"]
    assert train.calls == names
    cells = tmp_path / "results" / "cl" / "cells"
    export = cells / "s1_sdft_topk_lr0.001_seed0" / "export"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()
    stage2 = (cells / "s2_sdft_topk_lr0.001_seed0" / "config.yaml").read_text()
    assert f"name: {export}" in stage2 and "kind: science" in stage2
    text = tables.read_text()
    for needle in ("## Stage 1: train on Tool, evaluate every task", "## Stage 2: train on Sci",
                   "| Method | LR | Tool | Sci | Facts | Tool Δ vs base | Sci Δ vs base | Facts Δ vs base |",
                   "| Method | LR | Tool | Sci | Facts | Tool retention |",
                   "| Method | LR | Tool Δ stage 2 | Sci Δ stage 2 | Facts Δ stage 2 | Tool Δ vs base |",
                   "## Paired difference vs SFT after stage 1", "## Paired difference vs SFT after stage 2",
                   "| Method | LR | Δ Tool | Δ Sci | Δ Facts |", "Facts: " + str(tmp_path / "facts") + " (evaluated only)",
                   "| SDFT top-K | 0.001 |", "| Base model |", "| Method | LR | When | Tool (actions) |",
                   "| SFT | 0.001 | after stage 2 |"):
        assert needle in text, needle
    facts = json.loads((cells / "s2_sdft_topk_lr0.001_seed0" / RESULT_FILE).read_text())["scores"]["facts"]
    assert len(facts) == 4  # the evaluation-only task is scored in every cell
    assert (tables.parent / "stages.png").stat().st_size > 0

    # re-evaluation with longer science completions: every cell again, no step, the stage-1 export untouched
    exported = _files(export)
    _no_training_step(monkeypatch)

    def no_export(run_dir, out_dir):
        raise AssertionError(f"{run_dir}: exported again")
    again = CountingTrain()
    run_continual(_with_benchmark(spec, "sci", max_new_tokens=6), results_dir=tmp_path / "results", train_fn=again,
                  export_fn=no_export, log=lambda _: None)
    assert again.calls == names and _files(export) == exported
    assert all((cells / name / "cell.previous.json").is_file() for name in names)


def test_exported_lora_student_equals_the_trained_model(tmp_path, tiny_model_dir):
    """The merged export computes the same logits as the LoRA student it came from."""
    import torch

    from sdft.backends import build_backend
    from sdft.checkpoint import latest_checkpoint, load_checkpoint
    from sdft.config import load_config
    from sdft.export import export_student
    from sdft.models import load_model_and_tokenizer

    spec = load_spec(_write_spec(tmp_path, tiny_model_dir, "continual"))
    run_continual(spec, results_dir=tmp_path / "results", methods=["sdft_topk"], stages=[1], log=lambda _: None)
    run_dir = tmp_path / "results" / "cl" / "cells" / "s1_sdft_topk_lr0.001_seed0"
    out = export_student(run_dir, tmp_path / "exported")
    config = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model_and_tokenizer(config.model.name)
    backend = build_backend(config, steps=1, model=model, tokenizer=tokenizer)
    backend.load_state_tensors(load_checkpoint(latest_checkpoint(run_dir)).tensors)
    merged, _ = load_model_and_tokenizer(str(out))
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        want = backend.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        with backend.model.disable_adapter():
            untrained = backend.model(input_ids=ids).logits
    assert not torch.allclose(want, untrained, rtol=0, atol=1e-7)  # the step changed the student
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prepare_task_splits_by_api_once(tmp_path):
    task = load_spec(_write_spec(tmp_path, "unused", "ablation")).tasks["tool"]
    first = prepare_task(task, tmp_path / "data")
    from datasets import load_from_disk
    train, test = load_from_disk(first.train), load_from_disk(first.test)
    assert len(train) + len(test) == 12 and not set(train["name"]) & set(test["name"])
    assert "test APIs (never trained on)" in first.note
    stamp = (Path(first.test) / "dataset_info.json").stat().st_mtime_ns
    assert prepare_task(task, tmp_path / "data") == first
    assert (Path(first.test) / "dataset_info.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("seeds: [0, 1]", "seeds: [zero]"), "'seeds'"),
    (lambda s: s.replace("split: api", "split: bogus"), "tasks.tool.split"),
    (lambda s: s.replace("overrides: [algorithm=sft]", "overrides: [algorithm]"), "methods.sft.overrides"),
    (lambda s: s.replace("kind: science", "kind: poetry"), "tasks.sci.kind"),
    (lambda s: s.replace("also_score: [actions]", "also_score: [lenient]"), "tasks.tool.also_score"),
])
def test_spec_errors_name_the_key(tmp_path, mutate, message):
    path = _write_spec(tmp_path, "unused", "ablation")
    path.write_text(mutate(path.read_text()))
    with pytest.raises(ValueError, match=message):
        load_spec(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("seeds: [0, 1]", "seedz: [0, 1]"), r"unknown key 'seedz' \(did you mean 'seeds'\?\)"),
    (lambda s: s.replace("reference: topk", "referense: topk"),
     r"unknown key 'referense' \(did you mean 'reference'\?\)"),
    (lambda s: s + "flavour: mint\n", r"unknown key 'flavour'; allowed: \['columns', 'config', "),
    (lambda s: s.replace("split: api,", "split: api, test_fration: 0.2,"),
     r"unknown key 'tasks\.tool\.test_fration' \(did you mean 'tasks\.tool\.test_fraction'\?\); allowed: "
     r"\['also_score', 'benchmark', "),
    (lambda s: s.replace("small: {methods:", "small: {seedz: [0], methods:"),
     r"unknown key 'presets\.small\.seedz' \(did you mean 'presets\.small\.seeds'\?\)"),
])
def test_unknown_spec_keys_are_refused_with_a_close_match(tmp_path, mutate, message):
    path = _write_spec(tmp_path, "unused", "ablation")
    path.write_text(mutate(path.read_text()))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        load_spec(path)


def test_spec_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text"):
        load_spec(path)


def test_unknown_preset_and_selection_errors(tmp_path):
    path = _write_spec(tmp_path, "unused", "ablation")
    with pytest.raises(ValueError, match="preset 'huge' is not defined; allowed: \\['small'\\]"):
        load_spec(path, "huge")
    with pytest.raises(ValueError, match="unknown key 'method'"):
        parse_selection(["method=sft"], allowed=("methods",))
    assert parse_selection(["methods=a, b"], allowed=("methods",)) == {"methods": ["a", "b"]}


def test_bad_override_in_a_method_names_the_cell(tmp_path, tiny_model_dir):
    path = _write_spec(tmp_path, tiny_model_dir, "ablation")
    path.write_text(path.read_text().replace("objective.topk.k=5", "objective.topk.k=banana"))
    with pytest.raises(ValueError, match="cell base: .*objective.topk.k=banana.*expected an int"):
        run_ablation(load_spec(path), results_dir=tmp_path / "results", log=lambda _: None)


def test_paired_ratio_ci():
    rng = np.random.default_rng(0)
    before = (rng.random((2, 200)) < 0.6).astype(float)
    after = before * (rng.random((2, 200)) < 0.9)
    ratio, low, high = paired_ratio_ci(after, before)
    assert ratio == pytest.approx(after.mean() / before.mean())
    assert low < ratio < high and 0.8 < low and high < 1.0
    assert np.isnan(paired_ratio_ci(after, np.zeros_like(before))[0])


@pytest.mark.parametrize("script, args, message", [
    ("run_continual_learning.py", ["seeds=zero"], "seeds=zero: every value must be an integer"),
    ("run_continual_learning.py", ["stages=2"], "stages=2: allowed 1 or 1,2"),
    ("run_continual_learning.py", ["methods=sft,dpo"], "\\['dpo'\\] not in"),
    ("run_ablation.py", ["epochs=3"], "unknown key 'epochs'"),
])
def test_scripts_report_bad_selections(tmp_path, script, args, message):
    import re
    import subprocess
    import sys

    kind = "ablation" if script == "run_ablation.py" else "continual"
    spec = _write_spec(tmp_path, "unused", kind)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / script), "--config", str(spec), *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr


def test_ablation_on_the_offline_tinker_backend(tmp_path, tiny_model_dir):
    """The cookbook preset's path: the same grid on backend.kind=tinker (offline service), base row included."""
    pytest.importorskip("tinker")
    spec = load_spec(_write_spec(tmp_path, tiny_model_dir, "ablation"), "small")
    spec = dataclasses.replace(spec, overrides=[
        "backend.kind=tinker", "backend.tinker_service=offline", "backend.tinker_base_model=tiny/llama",
        "backend.tinker_lora_rank=4", "objective.reduction=sum", "objective.is_clip=null", "optim.beta2=0.95",
        "optim.max_grad_norm=null"])
    table = run_ablation(spec, results_dir=tmp_path / "results", seeds=[0], log=lambda _: None)
    text = table.read_text()
    assert "| Top-K | no |" in text and "| SFT | n/a |" in text and "| Base model | n/a |" in text
    result = json.loads((tmp_path / "results" / "abl_small" / "cells" / "topk_seed0" / RESULT_FILE).read_text())
    assert set(result["scores"]) == {"tool", "sci"}


@pytest.mark.parametrize("spec_file, preset", [
    ("ablation_tooluse.yaml", "tiny"), ("ablation_tooluse.yaml", "paper"), ("ablation_tooluse.yaml", "cookbook"),
    ("continual_learning.yaml", "tiny"), ("continual_learning.yaml", "paper"),
    ("ablation_tooluse.yaml", "laptop"), ("continual_learning.yaml", "laptop"),
])
def test_shipped_specs_give_a_valid_config_for_every_cell(tmp_path, spec_file, preset):
    from sdft.experiments.ablation import ablation_cells
    from sdft.experiments.continual import Arm, continual_cells, learning_rates
    from sdft.experiments.splits import TaskData

    repo = Path(__file__).resolve().parents[1]
    spec = load_spec(repo / "configs" / spec_file, preset)
    data = {name: TaskData(train=f"{name}/train" if task.trainable else None,
                           test=None if task.kind == "lm_eval" else f"{name}/test", note="")
            for name, task in spec.tasks.items()}
    if spec_file.startswith("ablation"):
        base, groups = ablation_cells(spec, data, tmp_path, methods=list(spec.methods), seeds=spec.seeds)
        cells = [base] + [c for group in groups.values() for c in group]
    else:
        arms = [Arm(m, lr) for m in spec.methods for lr in learning_rates(spec)]
        base, first, second = continual_cells(spec, data, tmp_path, arms=arms, seeds=spec.seeds, stages=[1, 2])
        cells = [base, *first, *second]
        stage2 = spec.tasks[spec.extra["stages"][1]].kind
        assert all(c.config.data.kind == stage2 and c.config.model.name.endswith("export") for c in second)
    for cell in cells:
        assert [b.name for b in cell.config.eval.benchmarks] == list(spec.tasks)
        assert cell.config.resume and cell.config.data.split == "none"


def test_a_changed_split_is_refused(tmp_path):
    task = load_spec(_write_spec(tmp_path, "unused", "ablation")).tasks["tool"]
    prepare_task(task, tmp_path / "data")
    moved = dataclasses.replace(task, split_seed=task.split_seed + 1, test_fraction=0.5)
    with pytest.raises(ValueError, match="holds a different split"):
        prepare_task(moved, tmp_path / "data")


def test_presets_add_and_remove_tasks_and_evaluation_only_tasks_are_not_trained(tmp_path):
    path = _write_spec(tmp_path, "unused", "ablation")
    train, test = tmp_path / "t.jsonl", tmp_path / "h.jsonl"
    for file in (train, test):
        file.write_text(json.dumps({"inputs": {"question": "q"}, "expected": "a"}) + "\n")
    path.write_text(path.read_text() + (
        f"  own:\n    train_task: calls\n    tasks:\n      tool: null\n      sci: null\n"
        f"      calls: {{title: Calls, kind: jsonl, train_path: {train}, test_path: {test}}}\n"
        f"      facts: {{title: Facts, kind: tasks, test_path: {tmp_path}}}\n"
        f"      hella: {{title: HellaSwag, kind: lm_eval, benchmark: {{task: hellaswag, metric: acc_norm}}}}\n"))
    spec = load_spec(path, "own")
    assert list(spec.tasks) == ["calls", "facts", "hella"] and spec.extra["train_task"] == "calls"
    assert [t.trainable for t in spec.tasks.values()] == [True, False, False]
    data = {name: prepare_task(task, tmp_path / "data") for name, task in spec.tasks.items()}
    assert data["calls"].train == str(train) and data["facts"].train is None and data["hella"].test is None
    from sdft.experiments.ablation import ablation_cells

    base, groups = ablation_cells(spec, data, tmp_path, methods=["sft"], seeds=[0])
    config = groups["sft"][0].config
    assert config.data.kind == "jsonl" and config.data.path == str(train)
    assert [(b.name, b.kind, b.path) for b in config.eval.benchmarks] == [
        ("calls", "jsonl", str(test)), ("facts", "tasks", str(tmp_path)), ("hella", "lm_eval", None)]
    assert config.eval.benchmarks[2].task == "hellaswag" and config.eval.benchmarks[2].metric == "acc_norm"
    with pytest.raises(ValueError, match="train_task 'facts' is evaluated only .*can be trained on: \\['calls'\\]"):
        ablation_cells(dataclasses.replace(spec, extra={"train_task": "facts"}), data, tmp_path, methods=["sft"],
                       seeds=[0])
    text = path.read_text()
    for mutate, message in (
            (lambda t: t.replace("      tool: null\n", "      tool2: {title: x}\n"),
             r"presets.own.tasks.tool2 is not a task; .*a new task needs its 'kind'"),
            (lambda t: t.replace("kind: tasks, test_path", "kind: tasks, train_path: x, test_path"),
             r"tasks.facts'.*test_path alone"),
            (lambda t: t.replace("benchmark: {task: hellaswag, metric: acc_norm}", "benchmark: {metric: acc}"),
             r"tasks.hella.benchmark.task")):
        path.write_text(mutate(text))
        with pytest.raises(ValueError, match=message):
            load_spec(path, "own")
