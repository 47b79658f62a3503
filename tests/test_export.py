"""`sdft export` as a user runs it: a PEFT adapter that `PeftModel.from_pretrained` loads and a merged model that
`AutoModelForCausalLM.from_pretrained` loads, both computing the run's student logits; tokenizer, chat template
and model card beside them; atomic, refusing to overwrite; Tinker runs exported through the SDK (offline service)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdft.cli import main
from sdft.eval_run import load_run_student
from sdft.runner import train_from_config
from tests.test_loop import _config

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 9, 17, 33, 2, 8, 40, 41]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _check_tokenizer(folder: Path, model_dir: str):
    from transformers import AutoTokenizer

    exported, original = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(model_dir)
    assert exported.chat_template == original.chat_template and exported.get_vocab() == original.get_vocab()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora")
    config = _config(tmp, tiny_model_dir, "optim.lr=5e-2", "teacher.mode=ema", "checkpoint.every=1",
                     "checkpoint.keep_last=5")
    return train_from_config(config).run_dir


def test_lora_adapter_and_merged_exports_compute_the_students_logits(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "sdft", "export", "--run", str(lora_run), "--format", "adapter",
                           str(tmp_path / "adapter")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["export", "--run", str(lora_run), "--format", "merged", str(tmp_path / "merged")]) == 0
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in merged.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(tiny_model_dir).resolve())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    student = load_run_student(lora_run).backend.model  # the checkpoint's student (adapter unmerged)
    want = _logits(student)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    untrained = _logits(base)
    got_adapter = _logits(PeftModel.from_pretrained(base, str(adapter)))
    got_merged = _logits(AutoModelForCausalLM.from_pretrained(str(merged)))
    assert not torch.allclose(want, untrained, atol=1e-4)  # training moved the student
    torch.testing.assert_close(got_adapter, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_merged, want, rtol=1e-5, atol=1e-5)
    for folder in (adapter, merged):
        _check_tokenizer(folder, tiny_model_dir)
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "Self-Distillation Fine-Tuning (SDFT)" in card
    assert f"Base model: `{Path(tiny_model_dir).resolve()}`" in card and "an EMA of the student" in card
    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    first, final = (next(r["metrics"] for r in order if r["split"] == "val") for order in (rows, rows[::-1]))
    assert (f"| val/bench | {first['val/bench/pass@1']:.3f} | {final['val/bench/pass@1']:.3f} (step 2) | "
            f"[{final['val/bench/ci_low']:.3f}, {final['val/bench/ci_high']:.3f}] | 3 |") in card
    assert "## Training config" in card and "teacher:\n  mode: ema" in card
    assert "PeftModel.from_pretrained" in card and "library_name: transformers" in (merged / "README.md").read_text()


def test_an_earlier_checkpoint_an_existing_folder_and_overwrite(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", "--run", str(lora_run), "--checkpoint", "step_00000001", "--format", "merged",
                 str(out)]) == 0
    step1 = _logits(AutoModelForCausalLM.from_pretrained(str(out)))
    torch.testing.assert_close(step1, _logits(load_run_student(lora_run, checkpoint="step_00000001").backend.model),
                               rtol=1e-5, atol=1e-5)
    assert "at optimizer step 1" in (out / "README.md").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", "--run", str(lora_run), "--format", "merged", str(out)]) == 2
    assert "exists; choose another folder or pass overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert main(["export", "--run", str(lora_run), "--format", "merged", "--overwrite", str(out)]) == 0
    assert "at optimizer step 2" in (out / "README.md").read_text()
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(str(out))), step1, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_full_fine_tuning_exports_merged_only(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    run = train_from_config(_config(tmp_path, tiny_model_dir, "student.mode=full", "optim.lr=1e-2")).run_dir
    assert main(["export", "--run", str(run), "--format", "adapter", str(tmp_path / "a")]) == 2
    assert "student.mode=full trains every weight, so there is no adapter" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["export", "--run", str(run), "--format", "merged", str(tmp_path / "m")]) == 0
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))),
                               _logits(load_run_student(run).backend.model), rtol=0, atol=1e-6)


def test_tinker_run_exports_through_the_sdk(tmp_path, tiny_model_dir):
    pytest.importorskip("tinker")
    from peft import PeftModel
    from tinker import types
    from transformers import AutoModelForCausalLM

    from sdft.backends.tinker_offline import OfflineServiceClient
    from sdft.checkpoint import latest_checkpoint, load_checkpoint
    from sdft.models import load_model_and_tokenizer
    from tests.test_tinker_runner import _tinker_config

    run = train_from_config(_tinker_config(tmp_path, tiny_model_dir)).run_dir
    assert main(["export", "--run", str(run), "--format", "adapter", str(tmp_path / "adapter")]) == 0
    assert main(["export", "--run", str(run), "--format", "merged", str(tmp_path / "merged")]) == 0
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 4 and "lm_head" in settings["target_modules"]  # tinker_train_unembed: the output layer too
    exports = list((run / "tinker_offline").glob("*/external_weights/*"))
    assert exports == []  # the temporary export on the service is deleted after the download

    # the service's own log-probs of the final state, through the SDK's sampling client
    state = load_checkpoint(latest_checkpoint(run)).objects["optimizer"]["tinker"]["state_path"]
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    service = OfflineServiceClient(model, tokenizer, base_model="tiny/llama", root=run / "tinker_offline")
    sampler = service.create_sampling_client(model_path=state).result()
    want = torch.tensor(sampler.compute_logprobs(types.ModelInput.from_ints(IDS[0].tolist())).result()[1:],
                        dtype=torch.float32)

    def token_logprobs(model):
        logprobs = torch.log_softmax(_logits(model)[0, :-1].double(), dim=-1)
        return logprobs.gather(1, IDS[0, 1:, None])[:, 0].float()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    untrained = token_logprobs(base)
    got_adapter = token_logprobs(PeftModel.from_pretrained(base, str(tmp_path / "adapter")))
    got_merged = token_logprobs(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")))
    assert not torch.allclose(want, untrained, atol=1e-4)
    torch.testing.assert_close(got_adapter, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_merged, want, rtol=0, atol=1e-5)  # the output layer's adapter merged untied
    merged_embeddings = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).get_input_embeddings().weight
    base_embeddings = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    torch.testing.assert_close(merged_embeddings, base_embeddings, rtol=0, atol=0)  # only the output layer moved
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "LoRA on the Tinker API" in card
    _check_tokenizer(tmp_path / "adapter", tiny_model_dir)
