"""Decoding with the LoRA adapter merged into copies of the base weights (sdft.backends.merged_lora)."""
import pytest
import torch

from sdft.backends.base import SamplingParams
from sdft.backends.merged_lora import merged_lora, should_merge
from tests.test_backend_local import make_backend, perturb_lora, prompts

IDS = torch.tensor([[5, 9, 17, 33, 2, 8, 40]])


def _snapshot(model):
    return {n: (p.detach().clone(), p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_untouched(model, before):
    for name, p in model.named_parameters():
        value, pointer, requires_grad = before[name]
        assert p.data_ptr() == pointer and torch.equal(p.detach(), value), name
        assert p.requires_grad == requires_grad, name


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_merged_forward_equals_the_adapter_forward_and_restores_every_weight(tiny_tokenizer, dtype, tol):
    backend = make_backend(tiny_tokenizer, dtype=dtype, lora_target_modules=["q_proj", "v_proj", "down_proj"])
    perturb_lora(backend)
    model = backend.model
    model.eval()
    before = _snapshot(model)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
        with merged_lora(model):
            got = model(input_ids=IDS).logits
            merged_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
            assert not torch.equal(merged_weight, before["base_model.model.model.layers.0.self_attn.q_proj"
                                                        ".base_layer.weight"][0])
        after = model(input_ids=IDS).logits
    assert (want - base).abs().max() > 100 * tol  # the adapter matters
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(after, want)  # the adapter path is back, unchanged
    _assert_untouched(model, before)


def test_an_error_inside_restores_the_weights(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer)
    perturb_lora(backend)
    before = _snapshot(backend.model)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_lora(backend.model):
            raise RuntimeError("inside")
    _assert_untouched(backend.model, before)
    assert not backend.model.get_base_model().model.layers[0].self_attn.q_proj.disable_adapters


@pytest.mark.parametrize("teacher_mode", ["static", "ema"])
def test_sampling_with_and_without_merging_agrees(tiny_tokenizer, teacher_mode):
    """Same seeds, fp64: same tokens, same sampler log-probs to rounding; the EMA teacher's second adapter
    is left out of the merge."""
    out = {}
    for mode in ("always", "never"):
        backend = make_backend(tiny_tokenizer, dtype=torch.float64, merge_lora=mode, teacher_mode=teacher_mode)
        perturb_lora(backend)
        if teacher_mode == "ema":
            backend.update_teacher(1)  # the teacher adapter now differs from the student's
        before = _snapshot(backend.model)
        out[mode] = (backend.sample(prompts(tiny_tokenizer), SamplingParams(12), seeds=[1, 2, 3, 4]),
                     backend.generate_greedy(prompts(tiny_tokenizer), 10))
        _assert_untouched(backend.model, before)
    (merged, merged_greedy), (plain, plain_greedy) = out["always"], out["never"]
    assert [r.completion_ids for r in merged] == [r.completion_ids for r in plain]
    assert merged_greedy == plain_greedy
    for a, b in zip(merged, plain):
        torch.testing.assert_close(torch.tensor(a.sampler_logprobs), torch.tensor(b.sampler_logprobs),
                                   rtol=0, atol=1e-10)


def test_should_merge_by_dtype_and_mode(tiny_tokenizer):
    assert make_backend(tiny_tokenizer).merge_lora  # fp32, auto
    assert not make_backend(tiny_tokenizer, dtype=torch.bfloat16).merge_lora
    assert make_backend(tiny_tokenizer, dtype=torch.bfloat16, merge_lora="always").merge_lora
    assert not make_backend(tiny_tokenizer, merge_lora="never").merge_lora
    assert not make_backend(tiny_tokenizer, student_mode="full").merge_lora
    with pytest.raises(ValueError, match="merge_lora must be one of auto, always, never"):
        should_merge(torch.nn.Linear(2, 2), "sometimes")


def test_config_key_is_checked():
    from sdft.config import load_config

    assert load_config(None, ["data.path=x"]).generation.merge_lora == "auto"
    with pytest.raises(ValueError, match="generation.merge_lora"):
        load_config(None, ["data.path=x", "generation.merge_lora=yes"])
