"""The public API of sdft.losses (names and signatures) and its errors on bad input."""
import inspect
import subprocess
import sys

import pytest
import torch

import sdft.losses as L

EXPECTED_SIGNATURES = {
    "kl_divergence": "(student_logits: 'torch.Tensor', teacher_logits: 'torch.Tensor', *, kind: 'str' = 'forward', "
                     "beta: 'float' = 0.5, temperature: 'float' = 1.0, mask=None, weights=None, "
                     "reduction: 'str' = 'token_mean', seq_ids=None) -> 'torch.Tensor'",
    "topk_distill_loss": "(student_logits: 'torch.Tensor', topk_ids: 'torch.Tensor', topk_logprobs: 'torch.Tensor', *, "
                         "normalize: 'str' = 'renormalize', kind: 'str' = 'cross_entropy', temperature: 'float' = 1.0, "
                         "mask=None, weights=None, reduction: 'str' = 'token_mean', seq_ids=None) -> 'torch.Tensor'",
    "sampled_token_loss": "(student_logprobs: 'torch.Tensor', teacher_logprobs: 'torch.Tensor', "
                          "sampler_logprobs: 'torch.Tensor', *, clip: 'float | None' = None, mask=None, weights=None, "
                          "reduction: 'str' = 'token_mean', seq_ids=None) -> 'torch.Tensor'",
    "fused_linear_kl": "(student_hidden: 'torch.Tensor', student_weight: 'torch.Tensor', teacher_hidden: 'torch.Tensor', "
                       "teacher_weight: 'torch.Tensor', *, kind: 'str' = 'forward', beta: 'float' = 0.5, "
                       "temperature: 'float' = 1.0, mask=None, weights=None, reduction: 'str' = 'token_mean', "
                       "seq_ids=None, student_bias=None, teacher_bias=None, chunk_size=None, impl: 'str' = 'auto', "
                       "return_per_token: 'bool' = False)",
    "fused_linear_topk": "(hidden: 'torch.Tensor', weight: 'torch.Tensor', k: 'int', *, bias=None, "
                         "temperature: 'float' = 1.0, chunk_size=None, impl: 'str' = 'auto') "
                         "-> 'tuple[torch.Tensor, torch.Tensor]'",
    "fused_linear_topk_distill_loss": "(student_hidden: 'torch.Tensor', student_weight: 'torch.Tensor', "
                                      "topk_ids: 'torch.Tensor', topk_logprobs: 'torch.Tensor', *, "
                                      "normalize: 'str' = 'renormalize', kind: 'str' = 'cross_entropy', "
                                      "temperature: 'float' = 1.0, mask=None, weights=None, "
                                      "reduction: 'str' = 'token_mean', seq_ids=None, student_bias=None, "
                                      "chunk_size=None, impl: 'str' = 'auto', return_per_token: 'bool' = False)",
    "fused_linear_token_logprobs": "(hidden: 'torch.Tensor', weight: 'torch.Tensor', token_ids: 'torch.Tensor', *, "
                                   "bias=None, temperature: 'float' = 1.0, chunk_size=None, impl: 'str' = 'auto', "
                                   "return_entropy: 'bool' = False)",
    "resolve_impl": "(impl: 'str', device: 'torch.device') -> 'str'",
    "topk_loss_from_logprobs": "(student_logprobs: 'torch.Tensor', topk_ids: 'torch.Tensor', "
                               "teacher_logprobs: 'torch.Tensor', *, vocab_size: 'int', "
                               "normalize: 'str' = 'renormalize', kind: 'str' = 'cross_entropy', mask=None, "
                               "weights=None, reduction: 'str' = 'none', seq_ids=None) -> 'torch.Tensor'",
}


def test_public_names_and_signatures_are_pinned():
    assert sorted(L.__all__) == sorted(EXPECTED_SIGNATURES)
    for name, expected in EXPECTED_SIGNATURES.items():
        assert str(inspect.signature(getattr(L, name))) == expected, name


def test_losses_import_nothing_else_from_sdft():
    code = ("import sys, sdft.losses; "
            "extra = sorted(m for m in sys.modules if m.startswith('sdft') and not m.startswith('sdft.losses') "
            "and m != 'sdft'); print(extra); "
            "heavy = [m for m in ('transformers', 'peft', 'accelerate', 'triton') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]"


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(8, 5)), "vocabulary mismatch.*V=7.*V=8"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 2), _t(4, 5), _t(7, 5)), "student_weight has shape \\(7, 2\\)"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(5, 5), _t(7, 5)), "teacher_hidden has 5 tokens"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), kind="kl"), "kind='kl'.*'forward', 'reverse', 'jsd'"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), reduction="mean"), "reduction='mean'.*'seq_mean'"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), impl="cuda"), "impl='cuda'.*'chunked'"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), beta=1.5), "beta=1.5"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), temperature=0), "temperature=0"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), reduction="seq_mean"), "needs seq_ids"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), mask=torch.ones(3, dtype=torch.bool)),
     "mask must have shape \\[4\\]"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), mask=torch.ones(4)), "mask must be a bool"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), chunk_size=0), "chunk_size=0"),
    (lambda: L.fused_linear_kl(torch.ones(4, 3, dtype=torch.int64), _t(7, 3), _t(4, 5), _t(7, 5)), "student_hidden has dtype"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3).to("meta"), _t(4, 5), _t(7, 5)), "one device"),
    (lambda: L.fused_linear_kl(_t(4, 3), _t(7, 3), _t(4, 5), _t(7, 5), student_bias=_t(6)), "student_bias must have shape \\[7\\]"),
    (lambda: L.fused_linear_topk(_t(4, 3), _t(7, 3), 8), "k=8 must be an int in \\[1, V=7\\]"),
    (lambda: L.fused_linear_topk_distill_loss(_t(4, 3), _t(7, 3), torch.zeros(4, 2, dtype=torch.long), _t(4, 2),
                                              normalize="softmax"), "normalize='softmax'.*'renormalize', 'tail'"),
    (lambda: L.fused_linear_topk_distill_loss(_t(4, 3), _t(7, 3), torch.zeros(4, 2, dtype=torch.long), _t(4, 2),
                                              kind="reverse"), "kind='reverse'.*'cross_entropy', 'forward_kl', 'reverse_kl'"),
    (lambda: L.fused_linear_topk_distill_loss(_t(4, 3), _t(7, 3), torch.zeros(4, 2, dtype=torch.long), _t(4, 2),
                                              normalize="tail", kind="reverse_kl"),
     "kind='reverse_kl' needs normalize='renormalize'.*normalize='tail'"),
    (lambda: L.topk_distill_loss(_t(4, 7), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), normalize="tail",
                                 kind="reverse_kl"), "kind='reverse_kl' needs normalize='renormalize'"),
    (lambda: L.topk_loss_from_logprobs(_t(4, 3), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), vocab_size=9),
     "student_logprobs \\(4, 3\\) must have the shape of topk_ids \\(4, 2\\)"),
    (lambda: L.topk_loss_from_logprobs(_t(4, 2), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), vocab_size=0),
     "vocab_size=0 must be an int >= 1"),
    (lambda: L.topk_loss_from_logprobs(_t(4, 2), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), vocab_size=9,
                                       kind="reverse_kl", normalize="tail"), "needs normalize='renormalize'"),
    (lambda: L.topk_loss_from_logprobs(_t(4, 2), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), vocab_size=9,
                                       reduction="seq_mean"), "needs seq_ids"),
    (lambda: L.topk_loss_from_logprobs(_t(4, 2), torch.zeros(4, 2, dtype=torch.long), _t(4, 2), vocab_size=9,
                                       mask=torch.ones(4)), "mask must be a bool"),
    (lambda: L.fused_linear_topk_distill_loss(_t(4, 3), _t(7, 3), torch.zeros(4, 2, dtype=torch.long), _t(4, 3)),
     "same shape"),
    (lambda: L.fused_linear_topk_distill_loss(_t(4, 3), _t(7, 3), torch.zeros(4, 2), _t(4, 2)), "integer tensor"),
    (lambda: L.fused_linear_token_logprobs(_t(4, 3), _t(7, 3), torch.tensor([0, 1, 7, 2])), "\\[0, 7\\)"),
    (lambda: L.kl_divergence(_t(4, 7), _t(4, 9)), "vocabulary mismatch"),
    (lambda: L.sampled_token_loss(_t(4), _t(3), _t(4)), "teacher_logprobs must have shape \\[4\\]"),
    (lambda: L.sampled_token_loss(_t(4), _t(4), _t(4), clip=-1), "clip=-1"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_auto_resolves_to_chunked_on_cpu():
    assert L.resolve_impl("auto", torch.device("cpu")) == "chunked"
    assert L.resolve_impl("reference", torch.device("cpu")) == "reference"
