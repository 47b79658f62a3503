import copy

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from sdft.backends.base import Backend
from sdft.backends.local import LocalBackend
from sdft.config import ModelConfig, ObjectiveConfig, OptimConfig, StudentConfig, TeacherConfig
from sdft.objectives import FullVocabTargets, SampledTargets, TopKTargets, build_objective
from sdft.sampling import NativeSampler, Rollout, SamplingParams
from tests.tiny import build_tiny_llama

TEXTS = ["What is the capital of France?", "The answer is", "Action: getWeather\nAction Input: {\"city\"",
         "0123456789 abc"]
HINT = " This is an example for a response to the question: The answer is B."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models gain nothing from intra-op threads, and on a shared 2-core machine thread
    oversubscription makes them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_model(tok, seed=0):
    return build_tiny_llama(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_backend(tok, *, seed=0, model_seed=0, student_mode="lora", lora_rank=4, lora_target_modules=None,
                 teacher_mode="static", ema_alpha=0.01, sync_every=0, lr=1e-2, max_grad_norm=None,
                 micro_batch_size=4, master_weights=True, dtype="float32", gradient_checkpointing=False, **kwargs):
    model = base_model(tok, model_seed)
    student = StudentConfig(mode=student_mode, lora_rank=lora_rank,
                            **({"lora_target_modules": lora_target_modules} if lora_target_modules else {}))
    teacher = TeacherConfig(mode=teacher_mode, ema_alpha=ema_alpha, sync_every=sync_every)
    optim = OptimConfig(lr=lr, max_grad_norm=max_grad_norm, schedule="constant", warmup_ratio=0.0,
                        micro_batch_size=micro_batch_size, batch_size=micro_batch_size, master_weights=master_weights)
    settings = ModelConfig(dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    return LocalBackend(model, tok, student=student, teacher=teacher, optim=optim, model_settings=settings, seed=seed,
                        **kwargs)


def objective(targets="full", *, topk=20, reduction="seq_mean", is_clip=None, temperature=1.0,
              skip_first_n_tokens=3, impl="auto"):
    """The objective of a test (is_clip off unless asked, unlike the config default)."""
    return build_objective(ObjectiveConfig.from_dict({
        "targets": targets, "topk": {"k": topk}, "reduction": reduction, "is_clip": is_clip,
        "temperature": temperature, "skip_first_n_tokens": skip_first_n_tokens, "impl": impl}))


def perturb_lora(backend, scale=0.3, seed=1):
    """Move the student adapter away from zero effect (LoRA B starts at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if ".default." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def teacher_prompts(tok):
    return [tok.encode(t + HINT) for t in TEXTS]


def capture_grads(backend, fn):
    """Run fn() and return the accumulated .grad of every trainable parameter after its last backward."""
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
             for n, p in backend.model.named_parameters() if p.requires_grad]
    try:
        out = fn()
    finally:
        for h in hooks:
            h.remove()
    return grads, out


def plain_logprobs(causal_lm, prompt, completion, temperature=1.0):
    """log_softmax over the vocabulary at the positions predicting `completion`: [T, V] (plain forward)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = causal_lm(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(completion)]
    return torch.log_softmax(logits.float() / temperature, -1)


# ------------------------------------------------------------------------------------------ sampling
def test_backend_satisfies_protocol(tiny_tokenizer):
    assert isinstance(make_backend(tiny_tokenizer), Backend)


def test_sampling_is_reproducible_with_a_seed(tiny_tokenizer):
    params = SamplingParams(max_new_tokens=10)
    backend = make_backend(tiny_tokenizer, seed=7)
    backend.model.train()
    global_rng = torch.get_rng_state()
    first = backend.sample(prompts(tiny_tokenizer), params)
    assert torch.equal(torch.get_rng_state(), global_rng)  # only the backend's own generator is used
    assert backend.model.training  # eval mode only while decoding
    second = make_backend(tiny_tokenizer, seed=7).sample(prompts(tiny_tokenizer), params)
    other = make_backend(tiny_tokenizer, seed=8).sample(prompts(tiny_tokenizer), params)
    assert first == second
    assert [r.completion_ids for r in first] != [r.completion_ids for r in other]
    for prompt, r in zip(prompts(tiny_tokenizer), first):
        assert r.prompt_ids == tuple(prompt)
        assert len(r.completion_ids) == len(r.sampler_logprobs) <= 10
        assert r.finished == (r.completion_ids[-1] == tiny_tokenizer.eos_token_id)
        assert tiny_tokenizer.eos_token_id not in r.completion_ids[:-1]
        assert r.finished or len(r.completion_ids) == 10


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_match_a_recomputed_forward(tiny_tokenizer, temperature, top_p):
    backend = make_backend(tiny_tokenizer, seed=3)
    perturb_lora(backend)
    rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(12, temperature=temperature, top_p=top_p))
    warper = TopPLogitsWarper(top_p) if top_p < 1 else None
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            p = len(r.prompt_ids)
            logits = backend.model(input_ids=ids).logits[0, p - 1:p - 1 + len(r.completion_ids)].float()
            scores = logits / temperature
            if warper is not None:
                scores = warper(ids, scores)
            expected = torch.log_softmax(scores, -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(r.sampler_logprobs), expected, rtol=0, atol=2e-5)


def test_left_padding_does_not_change_greedy_completions(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer)
    perturb_lora(backend)
    batch = prompts(tiny_tokenizer)
    assert len({len(p) for p in batch}) > 2
    together = backend.generate_greedy(batch, 12)
    alone = [backend.generate_greedy([p], 12)[0] for p in batch]
    assert together == alone
    # greedy = argmax of the plain forward at every step
    with torch.no_grad():
        for prompt, completion in zip(batch, alone):
            lp = plain_logprobs(backend.model, prompt, completion)
            assert lp.argmax(-1).tolist() == completion


def test_eos_stops_a_sequence_and_is_kept(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer)
    batch = prompts(tiny_tokenizer)
    first_tokens = [c[0] for c in backend.generate_greedy(batch, 1)]
    eos = first_tokens[0]
    stopper = NativeSampler(backend.module, tiny_tokenizer, eos_token_ids=[eos])
    greedy = stopper.greedy(batch, 6)
    assert greedy[0] == [eos]
    rollouts = stopper.sample(batch, SamplingParams(6, temperature=1e-3))  # near-greedy sampling
    assert rollouts[0].completion_ids == (eos,) and rollouts[0].finished
    for r, g in zip(rollouts, greedy):
        assert list(r.completion_ids) == g
        assert r.finished == (g[-1] == eos)


# ----------------------------------------------------------------------------------- teacher targets
def _handmade_rollouts(tok, lengths=(7, 1, 5, 10)):
    gen = torch.Generator().manual_seed(4)
    out = []
    for prompt, n in zip(prompts(tok), lengths):
        ids = torch.randint(3, len(tok), (n,), generator=gen).tolist()
        out.append(Rollout(tuple(prompt), tuple(ids), tuple([-1.0] * n), False))
    return out


def test_teacher_targets_sit_at_the_completion_positions(tiny_tokenizer):
    base = base_model(tiny_tokenizer)  # the static teacher is the base model
    backend = make_backend(tiny_tokenizer, forward_batch_size=3)
    perturb_lora(backend)  # the student differs; the static teacher must not
    rollouts = _handmade_rollouts(tiny_tokenizer)
    tprompts = teacher_prompts(tiny_tokenizer)
    temperature = 0.8
    full = backend.teacher_targets(tprompts, rollouts, objective("full", temperature=temperature))
    topk = backend.teacher_targets(tprompts, rollouts, objective("topk", topk=5, temperature=temperature))
    sampled = backend.teacher_targets(tprompts, rollouts, objective("sampled", temperature=temperature))
    assert isinstance(full, FullVocabTargets) and isinstance(topk, TopKTargets)
    assert isinstance(sampled, SampledTargets)
    with torch.no_grad():
        for i, (tp, r) in enumerate(zip(tprompts, rollouts)):
            expected = plain_logprobs(base, tp, r.completion_ids, temperature)  # [T, V]
            ids = torch.tensor(r.completion_ids)
            torch.testing.assert_close(sampled.teacher_logprobs[i], expected.gather(-1, ids[:, None])[:, 0],
                                       rtol=0, atol=1e-5)
            logits = full.hidden[i] @ full.weight.T
            torch.testing.assert_close(torch.log_softmax(logits / temperature, -1), expected, rtol=0, atol=1e-5)
            top_lp, top_ids = expected.topk(5, -1)
            assert torch.equal(topk.ids[i], top_ids)
            torch.testing.assert_close(topk.logprobs[i], top_lp, rtol=0, atol=1e-5)
            entropy = -(expected.exp() * expected).sum(-1)
            torch.testing.assert_close(sampled.teacher_entropy[i], entropy, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------- train step
def _reference_loss(backend, rollouts, tprompts, spec, teacher_lm):
    """The SDFT objective from materialized logits of plain forwards (independent of the backend)."""
    n = len(rollouts)
    spec = spec.settings
    counted = [max(0, len(r.completion_ids) - spec.skip_first_n_tokens) for r in rollouts]
    total = 0.0
    for r, tp, c in zip(rollouts, tprompts, counted):
        if c == 0:
            continue
        student = plain_logprobs(backend.model, r.prompt_ids, r.completion_ids, spec.temperature)
        with torch.no_grad():
            teacher = plain_logprobs(teacher_lm, tp, r.completion_ids, spec.temperature)
        ids = torch.tensor(r.completion_ids)
        sampler = torch.tensor(r.sampler_logprobs)
        if spec.targets == "full":
            per_token = (teacher.exp() * (teacher - student)).sum(-1)
        elif spec.targets == "topk":
            top_lp, top_ids = teacher.topk(spec.topk.k, -1)
            per_token = -(torch.softmax(top_lp, -1) * student.gather(-1, top_ids)).sum(-1)
        else:
            s_lp = student.gather(-1, ids[:, None])[:, 0]
            t_lp = teacher.gather(-1, ids[:, None])[:, 0]
            per_token = -torch.exp(s_lp - sampler) * (t_lp - sampler)
        per_token = per_token[spec.skip_first_n_tokens:]
        if spec.is_clip is not None and spec.targets != "sampled":
            s_lp = student.detach().gather(-1, ids[:, None])[:, 0][spec.skip_first_n_tokens:]
            ratio = torch.exp(s_lp - sampler[spec.skip_first_n_tokens:]).clamp(max=spec.is_clip)
            per_token = per_token * ratio.mean()
        if spec.reduction == "seq_mean":
            total = total + per_token.sum() / (c * n)
        elif spec.reduction == "token_mean":
            total = total + per_token.sum() / sum(counted)
        else:
            total = total + per_token.sum()
    return total


@pytest.mark.parametrize("student_mode, targets, reduction, is_clip", [
    ("lora", "full", "seq_mean", None),
    ("lora", "topk", "sum", None),
    ("lora", "sampled", "token_mean", None),
    ("lora", "full", "token_mean", 0.5),
    ("full", "full", "seq_mean", None),
    ("full", "topk", "token_mean", None),
])
def test_train_step_gradient_matches_materialized_reference(tiny_tokenizer, student_mode, targets, reduction,
                                                            is_clip):
    backend = make_backend(tiny_tokenizer, student_mode=student_mode, seed=2)
    if student_mode == "lora":
        perturb_lora(backend)
    base = base_model(tiny_tokenizer)  # the static teacher
    spec = objective(targets, reduction=reduction, topk=6, is_clip=is_clip, temperature=0.9)
    rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(9, temperature=0.9))
    tprompts = teacher_prompts(tiny_tokenizer)
    target = backend.teacher_targets(tprompts, rollouts, spec)

    holder = {}

    def reference_backward():
        holder["loss"] = _reference_loss(backend, rollouts, tprompts, spec, base)
        holder["loss"].backward()

    expected, _ = capture_grads(backend, reference_backward)
    backend.model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    grads, metrics = capture_grads(backend, lambda: backend.train_step(rollouts, target, spec))
    assert set(grads) == set(expected) == set(before)
    if student_mode == "full":
        assert "lm_head.weight" in grads or "model.embed_tokens.weight" in grads
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert metrics["loss"] == pytest.approx(float(holder["loss"]), rel=1e-4, abs=1e-6)
    changed = [n for n, p in backend.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the optimizer stepped
    assert metrics["lr"] == pytest.approx(1e-2)
    if is_clip is None:
        assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # sampler == trainer numerics
    else:  # every ratio is about 1, clipped to is_clip; a rollout without counted tokens has weight 1
        weights = [is_clip if len(r.completion_ids) > spec.settings.skip_first_n_tokens else 1.0 for r in rollouts]
        assert metrics["is_weight_mean"] == pytest.approx(sum(weights) / len(weights))
    for key in ("kl", "teacher_entropy", "student_entropy", "completion_len", "tokens_per_s", "step_time_s",
                "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def _twin_backends(tok, micro_batch_sizes=(4, 4), **kwargs):
    first, second = (make_backend(tok, micro_batch_size=m, **kwargs) for m in micro_batch_sizes)
    if kwargs.get("student_mode", "lora") == "lora":
        perturb_lora(first)
        perturb_lora(second)
    return first, second


@pytest.mark.parametrize("student_mode, targets, reduction, dtype", [
    ("lora", "full", "seq_mean", "float32"),
    ("lora", "full", "seq_mean", "float64"),
    ("lora", "topk", "token_mean", "float64"),
    ("full", "sampled", "sum", "float64"),
])
def test_gradient_accumulation_matches_one_batch(tiny_tokenizer, student_mode, targets, reduction, dtype):
    one, many = _twin_backends(tiny_tokenizer, (4, 1), student_mode=student_mode, dtype=dtype)
    spec = objective(targets, reduction=reduction, topk=4)
    rollouts = one.sample(prompts(tiny_tokenizer), SamplingParams(9))
    assert len({len(r.completion_ids) for r in rollouts}) > 1 or len({len(p) for p in prompts(tiny_tokenizer)}) > 1
    target = one.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
    g_one, m_one = capture_grads(one, lambda: one.train_step(rollouts, target, spec))
    g_many, m_many = capture_grads(many, lambda: many.train_step(rollouts, target, spec))
    assert set(g_one) == set(g_many)
    # fp32: the same sums in another order (padding changes the kernels); fp64: agreement to rounding
    atol = 1e-6 if dtype == "float32" else 1e-13 * max(float(g.abs().max()) for g in g_one.values())
    for name in g_one:
        torch.testing.assert_close(g_many[name], g_one[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, p), q in zip(one.model.named_parameters(), many.model.parameters()):
        if dtype == "float64":  # (in fp32, Adam's first step lr * g / |g| can flip sign where g ~ 0)
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for key in ("loss", "kl", "teacher_entropy", "student_entropy", "is_weight_mean", "grad_norm"):
        assert m_many[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key


def test_masked_first_tokens_do_not_affect_the_gradient(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer)
    perturb_lora(backend)
    spec = objective("full", skip_first_n_tokens=3)
    rollouts = _handmade_rollouts(tiny_tokenizer, lengths=(7, 0, 2, 10))
    target = backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
    gen = torch.Generator().manual_seed(0)

    def perturbed(rows):
        hidden = tuple(h.clone() for h in target.hidden)
        for h in hidden:
            h[rows] += 3.0 * torch.randn(h[rows].shape, generator=gen)
        return FullVocabTargets(hidden, target.weight, target.bias, target.teacher_entropy)

    def grads_for(t):
        grads, _ = capture_grads(backend, lambda: backend.train_step(rollouts, t, spec))
        return grads

    state = {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}

    def restore():
        with torch.no_grad():
            for n, p in backend.model.named_parameters():
                if n in state:
                    p.copy_(state[n])

    reference = grads_for(target)
    restore()
    masked = grads_for(perturbed(slice(0, 3)))
    restore()
    unmasked = grads_for(perturbed(slice(3, 4)))
    for name in reference:
        torch.testing.assert_close(masked[name], reference[name], rtol=0, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert any((unmasked[n] - reference[n]).abs().max() > 1e-6 for n in reference)
    # the empty and the 2-token rollouts have no token in the loss; the step still runs
    assert [len(r.completion_ids) for r in rollouts] == [7, 0, 2, 10]


def test_static_teacher_stays_the_base_while_the_student_moves(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer, lr=5e-2)
    spec = objective("sampled", skip_first_n_tokens=0)
    tprompts = teacher_prompts(tiny_tokenizer)
    rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(8))
    before = backend.teacher_targets(tprompts, rollouts, spec)
    student_before = [plain_logprobs(backend.model, tp, r.completion_ids).detach() for tp, r in zip(tprompts, rollouts)]
    lora_b = {n: p.detach().clone() for n, p in backend.model.named_parameters() if "lora_B.default" in n}
    assert all(torch.count_nonzero(p) == 0 for p in lora_b.values())
    for step in (1, 2):  # LoRA B is zero at first, so A only moves from the second step on
        backend.train_step(rollouts, backend.teacher_targets(tprompts, rollouts, spec), spec)
        backend.update_teacher(step)
    after = backend.teacher_targets(tprompts, rollouts, spec)
    for x, y in zip(before.teacher_logprobs, after.teacher_logprobs):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    with torch.no_grad():
        student_after = [plain_logprobs(backend.model, tp, r.completion_ids) for tp, r in zip(tprompts, rollouts)]
    assert max((a - b).abs().max() for a, b in zip(student_after, student_before)) > 1e-3
    assert any(torch.count_nonzero(p) > 0 for n, p in backend.model.named_parameters() if "lora_B.default" in n)


def test_ema_teacher_moves_by_exactly_alpha(tiny_tokenizer):
    backend = make_backend(tiny_tokenizer, teacher_mode="ema", ema_alpha=0.1)
    params = dict(backend.model.named_parameters())
    pairs = {n: n.replace(".default.", ".teacher.") for n in params if ".default." in n}
    phi0 = {t: params[t].detach().double().clone() for t in pairs.values()}
    spec = objective("topk", topk=5)
    rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(8))
    backend.train_step(rollouts, backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec), spec)
    backend.update_teacher(1)
    for s, t in pairs.items():
        expected = 0.9 * phi0[t] + 0.1 * params[s].detach().double()
        torch.testing.assert_close(params[t].double(), expected, rtol=0, atol=1e-7)
    assert any(torch.count_nonzero(params[t]) > 0 for t in pairs.values() if "lora_B" in t)
    assert set(backend.state_tensors()["teacher"]) == set(pairs)


def test_sft_step_is_token_mean_cross_entropy(tiny_tokenizer):
    one, many = _twin_backends(tiny_tokenizer, (4, 1))
    batch = prompts(tiny_tokenizer)
    targets = [tiny_tokenizer.encode(t) + [tiny_tokenizer.eos_token_id] for t in (" Paris", " B", " 42 is it", "x")]
    holder = {}

    def reference():
        total = sum(len(t) for t in targets)
        loss = 0.0
        for p, t in zip(batch, targets):
            lp = plain_logprobs(one.model, p, t)
            loss = loss - lp.gather(-1, torch.tensor(t)[:, None]).sum() / total
        holder["loss"] = loss
        loss.backward()

    expected, _ = capture_grads(one, reference)
    one.model.zero_grad(set_to_none=True)
    got, metrics = capture_grads(many, lambda: many.sft_step(batch, targets))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert metrics["loss"] == pytest.approx(float(holder["loss"]), rel=1e-5)
    assert metrics["loss_tokens"] == sum(len(t) for t in targets)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_tokenizer):
    plain, ckpt = make_backend(tiny_tokenizer), make_backend(tiny_tokenizer, gradient_checkpointing=True)
    perturb_lora(plain)
    perturb_lora(ckpt)
    spec = objective("full")
    rollouts = plain.sample(prompts(tiny_tokenizer), SamplingParams(8))
    target = plain.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
    g_plain, _ = capture_grads(plain, lambda: plain.train_step(rollouts, target, spec))
    g_ckpt, _ = capture_grads(ckpt, lambda: ckpt.train_step(rollouts, target, spec))
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("student_mode, teacher_mode", [("lora", "ema"), ("full", "sync")])
def test_bfloat16_training_runs(tiny_tokenizer, student_mode, teacher_mode):
    backend = make_backend(tiny_tokenizer, dtype="bfloat16", student_mode=student_mode, teacher_mode=teacher_mode,
                           sync_every=1, gradient_checkpointing=True, max_grad_norm=1.0)
    assert backend.model.get_output_embeddings().weight.dtype == torch.bfloat16
    spec = objective("full", is_clip=2.0)
    rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(6))
    target = backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
    assert target.hidden[0].dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    metrics = backend.train_step(rollouts, target, spec)
    backend.update_teacher(1)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(p, before[n]) for n, p in backend.model.named_parameters() if n in before)


def test_full_bf16_training_steps_fp32_masters(tiny_tokenizer):
    """Full fine-tuning in bf16: the optimizer holds fp32 masters, the model their rounded values, the
    checkpoint the masters; with master_weights=False, steps smaller than half a bf16 rounding step are lost
    and far fewer weights move."""
    spec = objective("full")
    moved = {}
    for masters in (True, False):
        backend = make_backend(tiny_tokenizer, dtype="bfloat16", student_mode="full", lr=1e-5, seed=2,
                               master_weights=masters)
        assert (backend.masters is not None) == masters
        rollouts = backend.sample(prompts(tiny_tokenizer), SamplingParams(6))
        target = backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
        before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        for _ in range(4):  # one step rounds alike either way; the masters keep what later steps add
            backend.train_step(rollouts, target, spec)
        state = backend.state_tensors()["student"]
        changed = [float((p.detach() != before[n]).float().mean()) for n, p in backend.model.named_parameters()
                   if p.dim() == 2]
        moved[masters] = sum(changed) / len(changed)
        for name, p in backend.model.named_parameters():
            assert p.dtype == torch.bfloat16 and p.grad is None
            if masters:
                assert state[name].dtype == torch.float32
                assert torch.equal(p.detach(), state[name].to(torch.bfloat16)), name
                assert not torch.equal(state[name], before[name].float()), name
            else:
                assert state[name].dtype == torch.bfloat16
    assert moved[False] < 0.5 * moved[True]
    lora = make_backend(tiny_tokenizer, dtype="bfloat16")
    assert lora.masters is None  # peft keeps LoRA adapters in fp32 already


def test_full_bf16_with_masters_resumes_exactly(tiny_tokenizer):
    spec = objective("full")
    kwargs = dict(dtype="bfloat16", student_mode="full", teacher_mode="ema", lr=1e-4)
    first = make_backend(tiny_tokenizer, seed=5, **kwargs)
    rollouts = first.sample(prompts(tiny_tokenizer), SamplingParams(6))
    first.train_step(rollouts, first.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec), spec)
    first.update_teacher(1)
    state = {g: {k: v.clone() for k, v in d.items()} for g, d in first.state_tensors().items()}
    opt_state = copy.deepcopy(first.optimizer_state())
    second = make_backend(tiny_tokenizer, seed=99, **kwargs)
    second.load_state_tensors(state)
    second.load_optimizer_state(opt_state)
    for backend in (first, second):
        r = backend.sample(prompts(tiny_tokenizer), SamplingParams(6))
        backend.train_step(r, backend.teacher_targets(teacher_prompts(tiny_tokenizer), r, spec), spec)
    a, b = first.state_tensors()["student"], second.state_tensors()["student"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))


def test_checkpoint_state_round_trip_resumes_exactly(tiny_tokenizer):
    spec = objective("topk", topk=4)
    first = make_backend(tiny_tokenizer, teacher_mode="ema", seed=5)
    rollouts = first.sample(prompts(tiny_tokenizer), SamplingParams(6))
    first.train_step(rollouts, first.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec), spec)
    first.update_teacher(1)
    state = {g: {k: v.clone() for k, v in d.items()} for g, d in first.state_tensors().items()}
    opt_state = first.optimizer_state()
    second = make_backend(tiny_tokenizer, teacher_mode="ema", seed=99)
    second.load_state_tensors(state)
    second.load_optimizer_state(opt_state)
    runs = []
    for backend in (first, second):
        r = backend.sample(prompts(tiny_tokenizer), SamplingParams(6))
        t = backend.teacher_targets(teacher_prompts(tiny_tokenizer), r, spec)
        runs.append((r, backend.train_step(r, t, spec)["loss"]))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-6)
    for (n, p), q in zip(first.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    with pytest.raises(ValueError, match="student"):
        second.load_state_tensors({"student": {}, "teacher": {}, "rng": state["rng"]})


def test_bad_arguments_raise_value_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="student.mode|mode"):
        StudentConfig.from_dict({"mode": "qlora"})
    with pytest.raises(ValueError, match="lora_target_modules"):
        make_backend(tiny_tokenizer, lora_target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.from_dict({"dtype": "float8"})
    with pytest.raises(ValueError, match="micro_batch_size"):
        OptimConfig.from_dict({"micro_batch_size": 0})
    backend = make_backend(tiny_tokenizer)
    rollouts = _handmade_rollouts(tiny_tokenizer)
    spec = objective("sampled")
    target = backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
    with pytest.raises(ValueError, match="TopKTargets"):
        backend.train_step(rollouts, target, objective("topk"))
    with pytest.raises(ValueError, match="one entry per rollout"):
        backend.train_step(rollouts[:2], target, spec)
    with pytest.raises(ValueError, match="teacher_prompt_ids"):
        backend.teacher_targets(teacher_prompts(tiny_tokenizer)[:1], rollouts, spec)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)
    with pytest.raises(ValueError, match="reduction"):
        ObjectiveConfig.from_dict({"reduction": "mean"})
    with pytest.raises(ValueError, match="sampler_logprobs"):
        Rollout((1,), (2, 3), (0.0,), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("student_mode", ["lora", "full"])
def test_cuda_bf16_train_step_matches_the_chunked_path(tiny_tokenizer, student_mode):
    """On CUDA, impl="auto" (Triton when importable) gives the gradient of the portable chunked path."""
    first, second = (make_backend(tiny_tokenizer, student_mode=student_mode, device="cuda", dtype="bfloat16",
                                  micro_batch_size=2) for _ in range(2))
    rollouts = first.sample(prompts(tiny_tokenizer), SamplingParams(8))
    grads = []
    for backend, impl in ((first, "auto"), (second, "chunked")):
        spec = objective("full", impl=impl)
        target = backend.teacher_targets(teacher_prompts(tiny_tokenizer), rollouts, spec)
        grads.append(capture_grads(backend, lambda: backend.train_step(rollouts, target, spec))[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name].float(), grads[1][name].float(), rtol=2e-2, atol=1e-4)


def test_per_prompt_seeds_make_sampling_independent_of_batching(tiny_tokenizer):
    """With seeds, a prompt's completion depends on its seed only: not on the other prompts in the batch."""
    backend = make_backend(tiny_tokenizer)
    prompts = [tiny_tokenizer(text)["input_ids"] for text in ("What is", "The capital of France is Paris", "0 1 2")]
    params = SamplingParams(max_new_tokens=12)
    together = backend.sample(prompts, params, seeds=[11, 22, 33])
    alone = [backend.sample([p], params, seeds=[s])[0] for p, s in zip(prompts, (11, 22, 33))]
    for a, b in zip(together, alone):
        assert a.completion_ids == b.completion_ids
        assert a.sampler_logprobs == pytest.approx(b.sampler_logprobs, abs=1e-5)
    other = backend.sample(prompts, params, seeds=[12, 22, 33])
    assert other[1].completion_ids == together[1].completion_ids
