"""The Tinker backend on the offline Tinker service: every loss path against the local backend on the
same rollouts, the SFT step, greedy generation and the sync teacher; bad teacher responses (short or padded
top-K lists, misaligned positions), transient errors and their retries, concurrency of teacher requests,
and the errors for a missing API key, an unknown base model and unsupported settings."""
import copy
import math

import pytest
import torch

pytest.importorskip("tinker")

from sdft.backends.base import Backend  # noqa: E402
from sdft.backends.tinker import require_api_key  # noqa: E402
from sdft.backends.tinker_responses import topk_rows_from_response  # noqa: E402
from sdft.config import BackendConfig  # noqa: E402
from sdft.objectives import SampledTargets, TopKTargets  # noqa: E402
from sdft.sampling import SamplingParams  # noqa: E402
from tests.builders import local_backend, objective, tinker_backend  # noqa: E402
from sdft.backends.tinker_offline import OfflineServiceClient  # noqa: E402
from sdft.loop import sampling_seed  # noqa: E402
from tests.test_tinker_parity import BASE, TARGETS, _backends, _lora, _prompts  # noqa: E402
from tests.tiny import build_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _offline(tokenizer, **kwargs):
    model = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return OfflineServiceClient(model, tokenizer, base_model=BASE, **kwargs)


def _same_step(local, tinker, spec, student, teacher, step=1, params=SamplingParams(max_new_tokens=10)):
    """Sample with both backends (identical rollouts), score and train one step; returns both metrics."""
    seeds = [sampling_seed(7, step, i) for i in range(len(student))]
    rollouts = local.sample(student, params, seeds=seeds)
    rollouts_tinker = tinker.sample(student, params, seeds=seeds)
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in rollouts_tinker]
    targets_local = local.teacher_targets(teacher, rollouts, spec)
    targets_tinker = tinker.teacher_targets(teacher, rollouts_tinker, spec)
    metrics_local = local.train_step(rollouts, targets_local, spec)
    metrics_tinker = tinker.train_step(rollouts_tinker, targets_tinker, spec)
    return metrics_local, metrics_tinker


def _assert_same_weights(local, tinker, rtol=1e-5):
    """The adapters agree: ||W_tinker - W_local|| <= rtol ||W_local|| over all LoRA tensors (Tinker's datum
    weights are float32, so a gradient entry that nearly cancels can differ in its last digits, which
    Adam's normalization then shows in that one entry)."""
    ours = tinker._training_client().lora_weights()
    theirs = _lora(local.state_tensors()["student"], "default")
    assert sorted(ours) == sorted(theirs)
    difference = torch.cat([(ours[k] - theirs[k]).flatten() for k in theirs]).norm()
    assert float(difference) <= rtol * float(torch.cat([v.flatten() for v in theirs.values()]).norm())


def test_tinker_backend_satisfies_the_protocol(tiny_tokenizer):
    backend = tinker_backend(BASE, tiny_tokenizer, _offline(tiny_tokenizer))
    assert isinstance(backend, Backend)


@pytest.mark.parametrize("spec_kwargs, path", [
    (dict(targets="topk", topk=8, topk_kind="forward_kl", reduction="seq_mean", is_clip=None), "cross_entropy"),
    (dict(targets="topk", topk=8, topk_normalize="tail", reduction="token_mean", is_clip=2.0), "custom"),
    (dict(targets="topk", topk=8, topk_kind="reverse_kl", reduction="seq_mean", is_clip=None), "custom"),
    (dict(targets="sampled", reduction="token_mean", is_clip=None), "importance_sampling"),
    (dict(targets="sampled", reduction="sum", is_clip=1.05), "custom"),
])
def test_every_loss_path_matches_the_local_backend(tiny_tokenizer, spec_kwargs, path, monkeypatch):
    """Built-in cross_entropy / importance_sampling and forward_backward_custom give the local backend's
    objective, divergence metric and update for every reduction, normalization, kind and IS clip."""
    local, tinker = _backends(tiny_tokenizer, lr=5e-2)
    student, teacher = _prompts(tiny_tokenizer)
    spec = objective(skip_first_n_tokens=2, **spec_kwargs)
    training = tinker._training_client()
    used = []
    for name in ("forward_backward", "forward_backward_custom"):
        original = getattr(training, name)
        monkeypatch.setattr(training, name, lambda data, loss_fn, _o=original, _n=name: (
            used.append(loss_fn if _n == "forward_backward" else "custom"), _o(data, loss_fn))[1])
    for step in (1, 2):  # step 2 starts from a trained adapter, so the IS weights differ from 1
        metrics_local, metrics_tinker = _same_step(local, tinker, spec, student, teacher, step=step)
        # abs: the sampled-token objective sums terms of both signs (advantages travel as float32)
        assert metrics_tinker["loss"] == pytest.approx(metrics_local["loss"], rel=1e-5, abs=1e-7)
        assert metrics_tinker["kl"] == pytest.approx(metrics_local["kl"], rel=1e-5, abs=1e-7)
        if not math.isnan(metrics_tinker["is_weight_mean"]):
            assert metrics_tinker["is_weight_mean"] == pytest.approx(metrics_local["is_weight_mean"], rel=1e-5)
        assert metrics_tinker["lr"] == metrics_local["lr"]
    assert used == [path, path]
    _assert_same_weights(local, tinker)


def test_sft_step_greedy_generation_and_sync_teacher_match_the_local_backend(tiny_tokenizer):
    base = build_tiny_llama(len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id).to(torch.float64)
    common = dict(teacher_mode="sync", sync_every=1, lr=5e-2, beta1=0.9, beta2=0.95, eps=1e-8, schedule="cosine",
                  steps=4, warmup_ratio=0.25, max_grad_norm=0.5, micro_batch_size=1)
    local = local_backend(copy.deepcopy(base), tiny_tokenizer, lora_rank=4, lora_alpha=8.0,
                          lora_target_modules=TARGETS, seed=0, generation_batch_size=1, dtype="float64", **common)
    service = OfflineServiceClient(copy.deepcopy(base), tiny_tokenizer, base_model=BASE, lora_alpha=8.0)
    tinker = tinker_backend(BASE, tiny_tokenizer, service, lora_rank=4, train_unembed=False, **common)
    student, teacher = _prompts(tiny_tokenizer)
    targets = [tiny_tokenizer.encode(" The answer is 4.") + [tiny_tokenizer.eos_token_id]] * len(student)
    sft_local = local.sft_step(student, targets)
    sft_tinker = tinker.sft_step(student, targets)
    assert sft_tinker["loss"] == pytest.approx(sft_local["loss"], rel=1e-5)
    assert sft_tinker["grad_norm"] == pytest.approx(sft_local["grad_norm"], rel=1e-5)  # clipped at 0.5 on both
    local.update_teacher(1)
    tinker.update_teacher(1)
    assert tinker.generate_greedy(student, 8, batch_size=3) == local.generate_greedy(student, 8)
    spec = objective("topk", topk=16, reduction="token_mean", is_clip=None)
    for step in (2, 3):  # the sync teacher (a copy of the student after every step) scores these
        metrics_local, metrics_tinker = _same_step(local, tinker, spec, student, teacher, step=step)
        assert metrics_tinker["loss"] == pytest.approx(metrics_local["loss"], rel=1e-5)
        assert metrics_tinker["lr"] == pytest.approx(metrics_local["lr"], rel=1e-12)
        local.update_teacher(step)
        tinker.update_teacher(step)
    assert tinker._teacher_path is not None and "sampler_weights" in tinker._teacher_path
    _assert_same_weights(local, tinker)


# ------------------------------------------------------------------------------ teacher responses
def test_topk_rows_drop_padding_out_of_vocabulary_and_repeated_ids_and_pad_short_lists():
    pad = (0, -99999.0)
    entries = [None, None,                                 # teacher prompt positions (not scored)
               [(5, -0.1), pad, (7, -2.0)],                # padding pair in the middle
               [(9, -0.5)],                                # shorter than K
               [(3, -0.2), (500, -1.0), (3, -3.0)],        # id outside the vocabulary, repeated id
               [(4, float("nan")), (6, -0.3), (8, -float("inf"))]]
    ids, lps, invalid = topk_rows_from_response(entries, prompt_len=2, completion_len=4, k=3, vocab_size=100)
    assert ids.tolist() == [[5, -1, 7], [9, -1, -1], [3, -1, -1], [-1, 6, -1]]
    assert lps[0].tolist() == pytest.approx([-0.1, 0.0, -2.0])
    assert invalid == 7
    # the loss sees exactly the valid slots, renormalized
    from sdft.losses.reference import topk_teacher_weights
    _, q, _ = topk_teacher_weights(ids, lps, 100, "renormalize")
    assert q.sum(-1).tolist() == pytest.approx([1.0] * 4)
    assert float(q[0, 1]) == 0.0 and float(q[0, 0]) == pytest.approx(1 / (1 + math.exp(-1.9)))


@pytest.mark.parametrize("entries, message", [
    ([None, [(1, -0.1)], [(2, -0.1)]], r"top-K entries for 3 positions, expected .* \(2 \+ 2 = 4\); refusing to guess"),
    ([None, [(1, -0.1)], None, [(2, -0.1)]], r"no top-K entry for completion token 0"),
    ([None, [(1, -0.1)], [(1, -0.1), (2, -0.2), (3, -0.3)], [(2, -0.1)]], r"3 top-K pairs .* more than K=2"),
    ([None, [(1, -0.1)], ["x"], [(2, -0.1)]], r"pair 0 of completion token 0 is 'x'"),
    (None, r"has no topk_prompt_logprobs"),
])
def test_topk_rows_refuse_misaligned_responses(entries, message):
    with pytest.raises(ValueError, match=message):
        topk_rows_from_response(entries, prompt_len=2, completion_len=2, k=2, vocab_size=50)


class _EditedTeacher:
    """Wraps the offline teacher sampling client and edits its top-K lists before the backend sees them."""

    def __init__(self, inner, edit):
        self.inner, self.edit = inner, edit

    def sample(self, **kwargs):
        response = self.inner.sample(**kwargs).result()
        return _Done(self.edit(response))

    def compute_logprobs(self, *args, **kwargs):
        return self.inner.compute_logprobs(*args, **kwargs)


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self, timeout=None):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class _Response:
    def __init__(self, topk):
        self.topk_prompt_logprobs = topk


def test_padded_and_short_teacher_lists_train_like_the_local_backend_on_the_same_targets(tiny_tokenizer):
    """Documented handling: padding pairs and missing slots become invalid slots (-1) that both backends
    ignore, renormalizing the rest; the two backends then agree on loss and update."""
    local, tinker = _backends(tiny_tokenizer)
    student, teacher = _prompts(tiny_tokenizer)
    spec = objective("topk", topk=6, reduction="sum", skip_first_n_tokens=1, is_clip=None)

    def edit(response):
        rows = response.topk_prompt_logprobs
        edited = [None if row is None else ([row[0], (0, -99999.0)] + row[2:4]) for row in rows]  # 4 of 6, padded
        return _Response(edited)

    tinker._teacher = _EditedTeacher(tinker._teacher_sampler(), edit)
    seeds = [sampling_seed(1, 1, i) for i in range(len(student))]
    params = SamplingParams(max_new_tokens=8)
    rollouts = tinker.sample(student, params, seeds=seeds)
    targets = tinker.teacher_targets(teacher, rollouts, spec)
    for ids in targets.ids:
        assert (ids[:, 1] == -1).all() and (ids[:, 4:] == -1).all() and (ids[:, [0, 2, 3]] >= 0).all()
    metrics_tinker = tinker.train_step(rollouts, targets, spec)
    assert metrics_tinker["teacher_topk_invalid_frac"] == pytest.approx(0.5)
    rollouts_local = local.sample(student, params, seeds=seeds)
    metrics_local = local.train_step(rollouts_local, targets, spec)
    assert metrics_tinker["loss"] == pytest.approx(metrics_local["loss"], rel=1e-5)
    _assert_same_weights(local, tinker)


def test_a_response_missing_a_position_is_an_error_not_a_shift(tiny_tokenizer):
    _, tinker = _backends(tiny_tokenizer)
    student, teacher = _prompts(tiny_tokenizer)
    tinker._teacher = _EditedTeacher(tinker._teacher_sampler(),
                                     lambda response: _Response(response.topk_prompt_logprobs[1:]))
    rollouts = tinker.sample(student, SamplingParams(max_new_tokens=4), seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"rollout 0 has top-K entries for \d+ positions, expected one per token"):
        tinker.teacher_targets(teacher, rollouts, objective("topk", topk=5, is_clip=None))


# ------------------------------------------------------------------------- futures and retries
class _FlakyTeacher:
    """The first `failures` results of every request raise a transient error; records submissions."""

    def __init__(self, inner, failures, error=ConnectionError):
        self.inner, self.failures, self.error = inner, failures, error
        self.events, self.attempts = [], {}

    def sample(self, **kwargs):
        key = tuple(kwargs["prompt"].to_ints())
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.events.append("submit")
        if self.attempts[key] <= self.failures:
            return _Recorded(self.events, self.error("connection reset by peer"))
        return _Recorded(self.events, self.inner.sample(**kwargs).result())


class _Recorded(_Done):
    def __init__(self, events, value):
        super().__init__(value)
        self.events = events

    def result(self, timeout=None):
        self.events.append("result")
        return super().result(timeout)


def test_teacher_requests_are_all_in_flight_and_transient_errors_are_retried_with_backoff(tiny_tokenizer):
    sleeps = []
    service = _offline(tiny_tokenizer)
    tinker = tinker_backend(BASE, tiny_tokenizer, service, lora_rank=4, max_retries=3, retry_backoff_s=0.5,
                            sleep=sleeps.append)
    student, teacher = _prompts(tiny_tokenizer)
    spec = objective("topk", topk=5, is_clip=None)
    rollouts = tinker.sample(student, SamplingParams(max_new_tokens=6), seeds=[1, 2, 3, 4])
    expected = tinker.teacher_targets(teacher, rollouts, spec)
    flaky = _FlakyTeacher(tinker._teacher_sampler(), failures=2)
    tinker._teacher = flaky
    got = tinker.teacher_targets(teacher, rollouts, spec)
    assert flaky.events[:4] == ["submit"] * 4  # every request submitted before the first result is awaited
    assert sleeps == [0.5, 1.0] * 4  # exponential backoff per request
    for a, b in zip(expected.ids, got.ids):
        assert torch.equal(a, b)

    tinker._teacher = _FlakyTeacher(flaky.inner, failures=10)
    with pytest.raises(RuntimeError, match=r"teacher scoring \(request 0\) failed after 4 attempts .*ConnectionError"):
        tinker.teacher_targets(teacher, rollouts, spec)
    tinker._teacher = _FlakyTeacher(flaky.inner, failures=1, error=ValueError)  # not transient: no retry
    with pytest.raises(ValueError, match="connection reset"):
        tinker.teacher_targets(teacher, rollouts, spec)


# --------------------------------------------------------------------------------- bad settings
def test_missing_api_key_is_named_before_any_network_call(tiny_tokenizer, monkeypatch):
    import tinker as sdk

    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.setattr(sdk, "ServiceClient", lambda *a, **k: pytest.fail("ServiceClient built without a key"))
    with pytest.raises(ValueError, match=r"TINKER_API_KEY is not set.*backend.tinker_service=offline"):
        tinker_backend("Qwen/Qwen3-8B", tiny_tokenizer, None)
    with pytest.raises(ValueError, match="TINKER_API_KEY"):
        require_api_key()
    monkeypatch.setenv("TINKER_API_KEY", "  ")
    with pytest.raises(ValueError, match="TINKER_API_KEY"):
        require_api_key()


def test_unknown_base_model_and_unsupported_settings_are_clear_errors(tiny_tokenizer):
    service = _offline(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"tinker_base_model='Qwen/Qwen3-8B' is not served .*available: tiny/llama-test"):
        tinker_backend("Qwen/Qwen3-8B", tiny_tokenizer, service)
    backend = tinker_backend(BASE, tiny_tokenizer, service)
    rollouts = backend.sample([[1, 2, 3]], SamplingParams(max_new_tokens=3), seeds=[0])
    with pytest.raises(ValueError, match=r"full-vocabulary targets need the teacher's hidden states.*"
                                         r"use objective.targets=topk or objective.targets=sampled"):
        backend.teacher_targets([[1, 2]], rollouts, objective("full"))
    with pytest.raises(ValueError, match=r"objective.topk.k must be at most the vocabulary size"):
        backend.teacher_targets([[1, 2]], rollouts, objective("topk", topk=10_000))
    with pytest.raises(ValueError, match=r"targets must be TopKTargets"):
        backend.train_step(rollouts, SampledTargets((torch.zeros(len(rollouts[0].completion_ids)),)),
                           objective("topk"))
    rows = len(rollouts[0].completion_ids) + 1
    with pytest.raises(ValueError, match=rf"targets\.\w+\[0\] has {rows} rows, expected one per completion token"):
        backend.train_step(rollouts, TopKTargets((torch.zeros(rows, 4, dtype=torch.long),), (torch.zeros(rows, 4),)),
                           objective("topk"))


def test_offline_service_rejects_what_it_does_not_implement(tiny_tokenizer):
    from tinker import types

    service = _offline(tiny_tokenizer)
    training = service.create_lora_training_client(BASE, rank=2, seed=0).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": torch.tensor([2, 3, 4])})
    with pytest.raises(ValueError, match=r"loss_fn 'ppo' is not implemented.*cross_entropy, importance_sampling"):
        training.forward_backward([datum], "ppo").result()
    with pytest.raises(ValueError, match=r"target_tokens'\] has shape \(2,\); expected \[3\]"):
        training.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                                               loss_fn_inputs={"target_tokens": torch.tensor([2, 3])})],
                                  "cross_entropy").result()
    with pytest.raises(ValueError, match=r"base model 'other' is not served .*available: 'tiny/llama-test'"):
        service.create_sampling_client(base_model="other").result()
    with pytest.raises(ValueError, match=r"unknown checkpoint tinker://run-9/weights/x"):
        service.create_training_client_from_state("tinker://run-9/weights/x").result()
    sampler = service.create_sampling_client(base_model=BASE).result()
    with pytest.raises(ValueError, match=r"top_k -1 or 0 \(off\) or 1 \(greedy\)"):
        sampler.sample(prompt=types.ModelInput.from_ints([1, 2]), num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=2, top_k=5)).result()
    # what it implements: cross-entropy is -sum(weights * log p), reported per datum and summed
    out = training.forward([datum], "cross_entropy").result()
    logprobs = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert logprobs.shape == (3,) and (logprobs < 0).all()
    assert out.metrics["loss:sum"] == pytest.approx(-float(logprobs.sum()), rel=1e-6)
    response = sampler.sample(prompt=types.ModelInput.from_ints([1, 2, 3, 4]), num_samples=2,
                              sampling_params=types.SamplingParams(max_tokens=1, seed=3),
                              include_prompt_logprobs=True, topk_prompt_logprobs=4).result()
    assert response.topk_prompt_logprobs[0] is None and len(response.topk_prompt_logprobs[1]) == 4
    assert response.prompt_logprobs[0] is None
    assert response.prompt_logprobs[2] == pytest.approx(sampler.compute_logprobs(
        types.ModelInput.from_ints([1, 2, 3, 4])).result()[2], rel=1e-5)
    assert len(response.sequences) == 2 and all(len(s.tokens) == 1 for s in response.sequences)
