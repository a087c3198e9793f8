"""The generator-RL maths against hand-computed values: the Flow-GRPO SDE step and its log-probability, group
advantages, top-k filtering, PPO's clipped surrogate and the Gaussian step KL."""

import math

import pytest
import torch

from spatialscore.train.losses import clipped_policy_loss, gaussian_step_kl, group_advantages, top_k_mask
from spatialscore.train.sde import gaussian_log_prob, sde_noise_scales, sde_step


def test_sde_step_matches_the_formula_by_hand():
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    t, t_next, s = 0.5, 0.25, 0.4  # dt = -0.25
    # mean = x (1 + s^2/(2t) dt) + v (1 + s^2 (1-t)/(2t)) dt = x * 0.96 + v * 1.08 * -0.25
    want_mean = torch.tensor([[1.0 * 0.96 - 0.5 * 0.27, -2.0 * 0.96 - 1.0 * 0.27]])
    noise = torch.tensor([[1.0, -1.0]])
    nxt, log_prob, mean, std = sde_step(x, v, t, t_next, s, noise=noise)
    assert torch.allclose(mean, want_mean) and std.item() == pytest.approx(0.2)
    assert torch.allclose(nxt, want_mean + 0.2 * noise)
    # both elements are one std away: log N = -1/2 - log 0.2 - log sqrt(2 pi)
    assert log_prob.item() == pytest.approx(-0.5 - math.log(0.2) - 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_without_noise_the_step_is_the_ode_euler_step():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    _, _, mean, std = sde_step(x, v, 0.8, 0.6, 0.0, noise=torch.zeros(3, 4))
    assert torch.allclose(mean, x - 0.2 * v, atol=1e-6) and std.item() == 0


def test_a_stored_step_is_rescored_not_redrawn():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    drawn, log_prob, _, _ = sde_step(x, v, 0.9, 0.7, 0.7, noise=torch.randn(2, 3, 4, 4))
    again, rescored, _, _ = sde_step(x, v, 0.9, 0.7, 0.7, next_sample=drawn)
    assert torch.equal(again, drawn) and torch.allclose(rescored, log_prob)
    _, other, _, _ = sde_step(x, v + 3.0, 0.9, 0.7, 0.7, next_sample=drawn)
    assert (other < log_prob).all()  # another velocity makes the stored step less likely


def test_noise_scales_cap_the_first_step_and_reject_bad_input():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    scales = sde_noise_scales(sigmas, 0.7)
    assert scales[0].item() == pytest.approx(0.7 * math.sqrt(1 / 0.25))  # 1 - 0.75 stands in for 1 - 1
    assert scales[1].item() == pytest.approx(0.7 * math.sqrt(0.75 / 0.25))
    assert scales[2].item() == pytest.approx(0.7) and len(scales) == 3
    with pytest.raises(ValueError, match="noise_level"):
        sde_noise_scales(sigmas, -1)
    with pytest.raises(ValueError, match="sigma_next must be smaller"):
        sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.5, 0.7)


def test_gaussian_log_prob_is_the_normal_density():
    x, mean = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 1.0]])
    want = (torch.distributions.Normal(mean, 2.0).log_prob(x)).mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, torch.tensor(2.0)), want)


def test_group_advantages_standardise_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0, 5.0]), 3)
    s = math.sqrt(8 / 3)
    assert torch.allclose(adv[:3], torch.tensor([-2 / s, 0.0, 2 / s]), atol=1e-3)
    assert torch.equal(adv[3:], torch.zeros(3))  # a group with one reward teaches nothing
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_top_k_keeps_the_best_and_worst_of_each_group():
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2,   # group 1: best 0.9, 0.7; worst 0.1, 0.2
                            1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    keep = top_k_mask(rewards, 6, 2)
    assert keep.tolist() == [False, True, True, False, True, True, True, True, False, False, True, True]
    assert top_k_mask(rewards, 6, 3).all()  # 2k >= G: nothing to filter
    with pytest.raises(ValueError, match="k >= 1"):
        top_k_mask(rewards, 6, 0)


def test_clipped_surrogate_by_hand():
    lp_old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    loss = clipped_policy_loss(lp, lp_old, adv, clip=0.2, reduction="none")
    # ratio 1 -> -2; ratio 1.5, A>0 -> clipped to 1.2 -> -1.2; ratio 0.5, A<0 -> clipped 0.8 -> 0.8; ratio 1.5, A<0 -> 1.5
    assert torch.allclose(loss, torch.tensor([-2.0, -1.2, 0.8, 1.5]))
    grad_lp = lp.clone().requires_grad_()
    clipped_policy_loss(grad_lp, lp_old, adv, clip=0.2, reduction="sum").backward()
    assert grad_lp.grad[1] == 0 and grad_lp.grad[2] == 0 and grad_lp.grad[3] != 0  # clipped terms pass no gradient


def test_step_kl_by_hand():
    mean, ref = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert gaussian_step_kl(mean, ref, 0.5).item() == pytest.approx((1 / (2 * 0.25) + 0) / 2)
    assert gaussian_step_kl(ref, ref, 0.5).item() == 0


def test_the_sde_keeps_the_flow_s_marginals():
    """With the exact velocity of a point mass c (x_t = (1 - t) c + t eps, so v = (x - c) / t), stochastic sampling
    from pure noise must pass through the flow's marginals N((1 - t) c, t^2): the drift correction is right."""
    torch.manual_seed(0)
    c, sigmas = torch.tensor([2.0, -1.0]), torch.linspace(1, 0, 41)
    scales = sde_noise_scales(sigmas, 0.7)
    x = torch.randn(20000, 2)
    for i in range(21):
        x, *_ = sde_step(x, (x - c) / sigmas[i], sigmas[i], sigmas[i + 1], scales[i])
    t = sigmas[21].item()
    assert torch.allclose(x.mean(0), (1 - t) * c, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), t), atol=0.03)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta):
    from diffusers import DDIMScheduler

    from spatialscore.train.sde import ddim_step

    torch.manual_seed(0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    prev_t = t - 1000 // 10
    x, eps, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    want = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    ours, log_prob, mean, std = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t], eta,
                                          noise=noise)
    assert torch.allclose(ours, want, atol=1e-5)
    if eta:
        _, rescored, _, _ = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t], eta,
                                      prev_sample=want)
        assert torch.allclose(rescored, log_prob) and torch.isfinite(log_prob).all()
        assert torch.allclose(log_prob, gaussian_log_prob(want, mean, std))
