"""lm-evaluation-harness tasks as benchmarks (sdft.lm_eval_bridge), on local task definitions shipped in
tests/data/lm_eval (the hub datasets are unreachable here): per-item outcomes equal an independent float64
computation of the same rule, and a run logs them like any other benchmark."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'sdft[lm_eval]')")

from sdft.config import load_config  # noqa: E402
from sdft.evaluation import evaluate_benchmarks  # noqa: E402
from sdft.lm_eval_bridge import LmEvalBenchmark, evaluate_lm_eval  # noqa: E402
from sdft.logs import read_metrics  # noqa: E402
from sdft.runner import train_from_config  # noqa: E402
from tests.test_loop import _config  # noqa: E402

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loglikelihood(model64, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) under a float64 copy of the model, the continuation's tokens being
    those of the whole text after the context's tokens (the harness' split)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model64(torch.tensor([whole])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Plain argmax decoding, cut at the first newline (the task's stop sequence)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return tokenizer.decode(out).split("\n")[0]


def test_multiple_choice_outcomes_equal_a_float64_argmax_of_choice_loglikelihoods(tmp_path, tiny_model,
                                                                                    tiny_tokenizer):
    benchmark = LmEvalBenchmark(name="choice", task="tiny_choice", include_path=str(TASKS))
    result = evaluate_lm_eval(benchmark, tiny_model, tiny_tokenizer, predictions_path=tmp_path / "p.jsonl")
    docs = _rows(TASKS / "tiny_choice.jsonl")
    rows = _rows(tmp_path / "p.jsonl")
    model64 = copy.deepcopy(tiny_model).double()
    expected = []
    for doc, row in zip(docs, rows):
        reference = [_loglikelihood(model64, tiny_tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        assert row["loglikelihoods"] == pytest.approx(reference, abs=1e-3)
        best = max(range(len(reference)), key=reference.__getitem__)
        expected.append(best == doc["label"])
        assert row["completion"] == " " + doc["choices"][best] and row["reference"] == doc["label"]
    assert [row["id"] for row in rows] == [f"tiny_choice/{i}" for i in range(len(docs))]
    assert result.per_item == expected and [row["correct"] for row in rows] == expected
    assert result.n == len(docs) and result.correct == sum(expected)
    assert result.pass_at_1 == pytest.approx(sum(expected) / len(docs))
    assert result.ci_low <= result.pass_at_1 <= result.ci_high
    assert benchmark.items == tuple(f"tiny_choice/{i}" for i in range(len(docs)))  # what --validate counts


def test_generation_outcomes_equal_exact_match_of_plain_greedy_decoding(tmp_path, tiny_model, tiny_tokenizer):
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    docs = _rows(TASKS / "tiny_generate.jsonl")
    decoded = [_greedy(tiny_model, tiny_tokenizer, doc["question"], 6) for doc in docs]
    for i in (0, 2):  # half of the answers are what the model writes, so both outcomes occur
        docs[i]["answer"] = decoded[i]
    (folder / "tiny_generate.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tiny_model.train()
    benchmark = LmEvalBenchmark(name="gen", task="tiny_generate", include_path=str(folder), metric="exact_match",
                                max_new_tokens=6)
    result = evaluate_lm_eval(benchmark, tiny_model, tiny_tokenizer, predictions_path=tmp_path / "g.jsonl")
    assert tiny_model.training  # the harness' eval() is undone
    rows = _rows(tmp_path / "g.jsonl")
    assert [row["completion"] for row in rows] == decoded
    assert result.per_item == [d["answer"] == text for d, text in zip(docs, decoded)] == [True, False, True, False]


def test_bad_task_metric_and_missing_model_are_refused(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="task 'nope' is not in the folder"):
        evaluate_lm_eval(LmEvalBenchmark(name="x", task="nope", include_path=str(TASKS)), tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"no per-document metric 'f1'; its metrics: \['acc', 'acc_norm'\]"):
        evaluate_lm_eval(LmEvalBenchmark(name="x", task="tiny_choice", include_path=str(TASKS), metric="f1"),
                         tiny_model, tiny_tokenizer, max_items=2)
    with pytest.raises(ValueError, match="is not a folder of lm-eval task YAMLs"):
        LmEvalBenchmark(name="x", task="tiny_choice", include_path=str(tmp_path / "absent"))
    benchmark = LmEvalBenchmark(name="x", task="tiny_choice", include_path=str(TASKS))
    with pytest.raises(ValueError, match="needs the model itself"):
        evaluate_benchmarks([(benchmark, None)], lambda p, n: [[] for _ in p], tiny_tokenizer, predictions_dir=tmp_path)
    with pytest.raises(ValueError, match=r"eval.benchmarks\[0\].task is required for .*kind=lm_eval"):
        load_config(None, ["data.path=x.jsonl", "eval.benchmarks=[{name: h, kind: lm_eval}]"])
    with pytest.raises(ValueError, match=r"task='hellaswag' is only read by kind=lm_eval"):
        load_config(None, ["data.path=x.jsonl", "eval.benchmarks=[{name: h, kind: tasks, path: p, task: hellaswag}]"])


def test_a_run_logs_lm_eval_benchmarks_before_and_after_training(tmp_path, tiny_model_dir):
    benchmarks = ("eval.benchmarks=[{name: bench, kind: tasks, path: " + str(tmp_path / "bench")
                  + ", max_new_tokens: 4}, {name: choice, kind: lm_eval, task: tiny_choice, path: " + str(TASKS)
                  + ", max_items: 4}]")
    config = _config(tmp_path, tiny_model_dir, "optim.lr=5e-2", benchmarks)
    result = train_from_config(config)
    run = result.run_dir
    for when, scores in (("before", result.scores_before), ("after", result.scores_after)):
        assert scores["choice"].n == 4
        tag = ".before" if when == "before" else ""
        rows = _rows(run / "predictions" / f"choice{tag}.jsonl")
        assert [r["correct"] for r in rows] == scores["choice"].per_item
    evals = {r["step"]: r["metrics"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"}
    assert evals[0]["val/choice/pass@1"] == result.scores_before["choice"].pass_at_1
    assert evals[2]["val/choice/n"] == 4 and "val/bench/pass@1" in evals[2]
    before = _rows(run / "predictions" / "choice.before.jsonl")
    after = _rows(run / "predictions" / "choice.jsonl")
    assert [r["loglikelihoods"] for r in before] != [r["loglikelihoods"] for r in after]  # the student was scored
    assert "| choice |" in (run / "summary.md").read_text()


def test_lm_eval_benchmarks_are_refused_in_a_multi_process_run():
    """The harness scores a whole model in one process: a DDP or FSDP2 run with such a benchmark stops at the
    start, naming the way out, before any model is loaded."""
    from sdft.backends import build_backend
    from sdft.parallel import Parallel

    config = load_config(None, ["data.path=x.jsonl", "model.name=never-loaded",
                                "eval.benchmarks=[{name: hs, kind: lm_eval, task: hellaswag}]"])
    with pytest.raises(ValueError, match=r"\['hs'\] of kind lm_eval .* got 2 processes: evaluate the run afterwards"):
        build_backend(config, steps=1, parallel=Parallel(mode="ddp", rank=0, world_size=2))
