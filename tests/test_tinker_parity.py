"""Parity: the local backend and the Tinker backend (on the offline Tinker service) train the same tiny
float64 model identically: same rollouts, same per-step losses and the same LoRA weights after 3 steps,
with the cookbook's setup (static teacher, top-K = 20 renormalized, cross-entropy, sum reduction,
Adam(0.9, 0.95, 1e-8), constant lr, no clipping)."""
import copy

import pytest
import torch

pytest.importorskip("tinker")

from sdft.sampling import SamplingParams  # noqa: E402
from tests.builders import local_backend, objective, tinker_backend  # noqa: E402
from sdft.backends.tinker_offline import OfflineServiceClient  # noqa: E402
from sdft.loop import sampling_seed  # noqa: E402
from tests.tiny import build_tiny_llama  # noqa: E402

BASE = "tiny/llama-test"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [("What is 2 plus 2?", "2 plus 2 is 4."), ("Name the capital of France.", "The capital is Paris."),
             ("What is 3 plus 4?", "3 plus 4 is 7."), ("Say the answer A.", "The answer is A.")]


def _prompts(tokenizer):
    student, teacher = [], []
    for question, answer in QUESTIONS:
        student.append(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=True))
        demo = f"{question}\nThis is an example for a response to the question:\n{answer}\nNow answer."
        teacher.append(tokenizer.apply_chat_template([{"role": "user", "content": demo}],
                                                     add_generation_prompt=True, tokenize=True))
    return [list(_ids(p)) for p in student], [list(_ids(p)) for p in teacher]


def _ids(encoded):
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded


def _backends(tokenizer, lr=2e-2):
    base = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id).to(torch.float64)
    common = dict(lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, schedule="constant", steps=3, max_grad_norm=None)
    local = local_backend(copy.deepcopy(base), tokenizer, lora_rank=4, lora_alpha=8.0, lora_target_modules=TARGETS,
                          dtype="float64", seed=0, generation_batch_size=1, **common)
    service = OfflineServiceClient(copy.deepcopy(base), tokenizer, base_model=BASE, lora_alpha=8.0)
    tinker = tinker_backend(BASE, tokenizer, service, lora_rank=4, seed=0, train_unembed=False, **common)
    return local, tinker


def _lora(named: dict, adapter: str) -> dict:
    return {name.replace(f".{adapter}.", "."): tensor.detach().clone() for name, tensor in named.items()}


def test_parity_local_and_tinker_offline_losses_and_lora_weights(tiny_tokenizer):
    local, tinker = _backends(tiny_tokenizer)
    student, teacher = _prompts(tiny_tokenizer)
    spec = objective("topk", topk=20, topk_normalize="renormalize", topk_kind="cross_entropy",
                     reduction="sum", skip_first_n_tokens=3, is_clip=None)
    params = SamplingParams(max_new_tokens=12)
    tinker_lora = lambda: _lora(tinker._training_client().lora_weights(), "unused")  # noqa: E731
    start_local = _lora(local.state_tensors()["student"], "default")
    assert sorted(start_local) == sorted(tinker_lora())
    for name, value in tinker_lora().items():
        torch.testing.assert_close(value, start_local[name], rtol=0, atol=0)  # identical LoRA init

    for step in range(1, 4):
        seeds = [sampling_seed(0, step, i) for i in range(len(student))]
        rollouts_local = local.sample(student, params, seeds=seeds)
        rollouts_tinker = tinker.sample(student, params, seeds=seeds)
        assert [r.completion_ids for r in rollouts_local] == [r.completion_ids for r in rollouts_tinker]
        assert sum(len(r.completion_ids) for r in rollouts_local) > 4 * spec.settings.skip_first_n_tokens
        for a, b in zip(rollouts_local, rollouts_tinker):
            assert a.finished == b.finished
            torch.testing.assert_close(torch.tensor(a.sampler_logprobs), torch.tensor(b.sampler_logprobs),
                                       rtol=1e-5, atol=1e-6)
        targets_local = local.teacher_targets(teacher, rollouts_local, spec)
        targets_tinker = tinker.teacher_targets(teacher, rollouts_tinker, spec)
        for ids_l, ids_t, lp_l, lp_t in zip(targets_local.ids, targets_tinker.ids, targets_local.logprobs,
                                            targets_tinker.logprobs):
            assert torch.equal(ids_l, ids_t)
            torch.testing.assert_close(lp_l, lp_t, rtol=1e-6, atol=1e-6)
        metrics_local = local.train_step(rollouts_local, targets_local, spec)
        metrics_tinker = tinker.train_step(rollouts_tinker, targets_tinker, spec)
        assert metrics_local["loss"] > 0
        assert abs(metrics_tinker["loss"] - metrics_local["loss"]) <= 1e-5 * abs(metrics_local["loss"]), step
        assert metrics_tinker["kl"] == pytest.approx(metrics_local["kl"], rel=1e-5)
        assert metrics_tinker["loss_tokens"] == metrics_local["loss_tokens"]
        assert metrics_tinker["grad_norm"] == pytest.approx(metrics_local["grad_norm"], rel=1e-5)
        local.update_teacher(step)
        tinker.update_teacher(step)

    after_local = _lora(local.state_tensors()["student"], "default")
    after_tinker = tinker_lora()
    moved = 0.0
    for name, value in after_local.items():
        torch.testing.assert_close(after_tinker[name], value, rtol=1e-5, atol=1e-9)
        moved = max(moved, float((value - start_local[name]).abs().max()))
    assert moved > 1e-3  # the three steps really trained the adapter
