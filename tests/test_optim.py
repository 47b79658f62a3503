import math

import pytest
import torch

from sdft.optim import build_optimizer, build_schedule, lr_factor


def _params(*shapes):
    return [torch.nn.Parameter(torch.randn(*s)) for s in shapes]


def test_adamw_first_step_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = build_optimizer([p, frozen], lr=0.1, weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups[0]["params"]) == 1  # frozen parameters are left out
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    g = torch.tensor([0.3, -0.2, 0.0])
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    # decoupled decay, then m_hat = g, v_hat = g^2 after bias correction: update = lr * g / (|g| + eps)
    expected = before * (1 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, word", [
    (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=1e-3, weight_decay=-1), "weight_decay"),
    (dict(lr=1e-3, beta1=1.0), "beta1"), (dict(lr=1e-3, beta2=-0.1), "beta2"), (dict(lr=1e-3, eps=0), "eps"),
])
def test_build_optimizer_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_optimizer(_params((2,)), **kwargs)


def test_build_optimizer_needs_trainable_params():
    with pytest.raises(ValueError, match="params"):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], lr=1e-3)


def test_cosine_schedule_with_warmup_values():
    total, ratio = 10, 0.15  # W = ceil(1.5) = 2
    factors = [lr_factor(s, schedule="cosine", total_steps=total, warmup_ratio=ratio) for s in range(total)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert lr_factor(total, schedule="cosine", total_steps=total, warmup_ratio=ratio) == pytest.approx(0.0)


def test_constant_schedule_and_lr_seen_by_optimizer():
    p = _params((3,))
    opt = build_optimizer(p, lr=0.2)
    sched = build_schedule(opt, schedule="constant", total_steps=8, warmup_ratio=0.5)  # W = 4
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        p[0].grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2, 0.2])


def test_no_warmup_starts_at_full_lr():
    opt = build_optimizer(_params((1,)), lr=0.3)
    build_schedule(opt, schedule="cosine", total_steps=4, warmup_ratio=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)


def test_schedule_state_round_trip():
    p = _params((2,))
    opt = build_optimizer(p, lr=1.0)
    sched = build_schedule(opt, schedule="cosine", total_steps=10, warmup_ratio=0.1)
    for _ in range(3):
        p[0].grad = torch.ones(2)
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(_params((2,)), lr=1.0)
    sched2 = build_schedule(opt2, schedule="cosine", total_steps=10, warmup_ratio=0.1)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 3
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


@pytest.mark.parametrize("kwargs, word", [
    (dict(schedule="linear", total_steps=5), "schedule"), (dict(total_steps=0), "total_steps"),
    (dict(total_steps=2.5), "total_steps"), (dict(total_steps=5, warmup_ratio=1.0), "warmup_ratio"),
    (dict(total_steps=5, warmup_ratio=-0.1), "warmup_ratio"),
])
def test_build_schedule_rejects_bad_values(kwargs, word):
    opt = build_optimizer(_params((1,)), lr=1e-3)
    with pytest.raises(ValueError, match=word):
        build_schedule(opt, **kwargs)


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """A constant gradient and lr 1e-5 for 5 steps: in bf16 in place nothing moves; with fp32 masters the
    masters follow fp32 AdamW exactly and the model holds their rounded values."""
    from sdft.optim import MasterWeights

    torch.manual_seed(0)
    init = (torch.rand(64, 64) * 0.1 + 0.02).to(torch.bfloat16)  # |w| in [0.02, 0.12]
    grad = torch.randn(64, 64).to(torch.bfloat16)
    plain = init.clone().requires_grad_()
    opt = build_optimizer([plain], lr=1e-5)
    model_w = torch.nn.Parameter(init.clone())
    masters = MasterWeights({"w": model_w, "b": torch.nn.Parameter(torch.zeros(3))})
    assert masters.parameters()[1] is masters.pairs["b"][0]  # fp32 parameters are their own masters
    mopt = build_optimizer(masters.parameters(), lr=1e-5)
    ref = init.float().clone().requires_grad_()
    ropt = build_optimizer([ref], lr=1e-5)
    for _ in range(5):
        plain.grad = grad.clone()
        opt.step()
        model_w.grad = grad.clone()
        masters.grads_to_masters()
        assert model_w.grad is None and masters.parameters()[0].grad.dtype == torch.float32
        mopt.step()
        masters.masters_to_model()
        ref.grad = grad.float()
        ropt.step()
    assert torch.equal(plain.detach(), init)
    master = masters.state_tensors()["w"]
    assert torch.equal(master, ref.detach()) and not torch.equal(master, init.float())
    assert torch.equal(model_w.detach(), master.to(torch.bfloat16))
    masters.load_state_tensors({"w": init.float(), "b": torch.ones(3)})
    assert torch.equal(model_w.detach(), init) and torch.equal(masters.pairs["b"][0].detach(), torch.ones(3))
