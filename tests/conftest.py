import os

# Tests never touch the network: Hugging Face libraries read these when they are imported (subprocesses inherit them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from tests.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama and its tokenizer, loadable with from_pretrained."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
