"""Preference losses against hand-computed values (float64), plus their limits, gradients and input checks."""

import math

import pytest
import torch

from spatialscore.train.losses import bt_loss, gaussian_bt_loss, gaussian_bt_prob, pairwise_accuracy


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


# eps=0 in the exact checks: the default 1e-6 under the sqrt moves the 9th digit.

def test_gaussian_bt_z_equals_one():
    # sd = sqrt(0.5 + 0.5) = 1, z = (1 - 0) / 1 = 1, P = Phi(1) = 0.841344746, loss = -ln(0.841344746) = 0.172753779
    s = t(math.sqrt(0.5))
    assert gaussian_bt_prob(t(1.0), s, t(0.0), s, eps=0.0).item() == pytest.approx(0.841344746, abs=1e-9)
    assert gaussian_bt_loss(t(1.0), s, t(0.0), s, eps=0.0).item() == pytest.approx(0.172753779, abs=1e-9)


def test_gaussian_bt_wrong_order():
    # sd = sqrt(1 + 1) = sqrt(2), z = (0 - 2) / sqrt(2) = -1.41421356, P = Phi(-1.41421356) = 0.5 erfc(1) = 0.0786496
    # loss = -ln(0.0786496035) = 2.5427527
    one = t(1.0)
    assert gaussian_bt_prob(t(0.0), one, t(2.0), one, eps=0.0).item() == pytest.approx(0.0786496035, abs=1e-9)
    assert gaussian_bt_loss(t(0.0), one, t(2.0), one, eps=0.0).item() == pytest.approx(2.5427527, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 1e-8])
def test_gaussian_bt_hard_step_as_sigma_vanishes(sigma):
    s = t(sigma, grad=True)
    # z = 0.2 / sqrt(1e-6) = 200: Phi(200) = 1 to double precision, loss ~ 0
    assert gaussian_bt_loss(t(0.3), s, t(0.1), s).item() < 1e-6
    # z = -200: loss ~ 200^2 / 2 = 2e4, large but finite, and so is every gradient
    mu_c, mu_r = t(0.1, grad=True), t(0.3, grad=True)
    loss = gaussian_bt_loss(mu_c, s, mu_r, s)
    loss.backward()
    assert 1e4 < loss.item() < math.inf
    assert all(torch.isfinite(g).all() for g in (mu_c.grad, mu_r.grad, s.grad))
    # equal means: z = 0 / sqrt(eps) = 0, P = Phi(0) = 0.5, loss = ln 2 = 0.693147
    assert gaussian_bt_prob(t(0.2), s, t(0.2), s).item() == 0.5
    assert gaussian_bt_loss(t(0.2), s, t(0.2), s).item() == pytest.approx(math.log(2), abs=1e-12)


def test_gaussian_bt_large_negative_margin_is_finite():
    # z = -50 / sqrt(2) = -35.3553391; Mills ratio tail: -ln Phi(z) ~ z^2/2 + ln(-z) + ln(2 pi)/2
    # = 625 + 3.5654 + 0.9189 = 629.4844; ln(Phi(z)) itself would be ln(0) = -inf
    mu_c, mu_r, one = t(0.0, grad=True), t(50.0, grad=True), t(1.0, grad=True)
    loss = gaussian_bt_loss(mu_c, one, mu_r, one)
    loss.backward()
    assert loss.item() == pytest.approx(629.4844, rel=1e-3)
    assert all(torch.isfinite(g).all() for g in (mu_c.grad, mu_r.grad, one.grad))


def test_gaussian_bt_is_not_plain_bt():
    # both with unit variance of the difference and margin 0.5:
    # Gaussian: -ln Phi(0.5) = -ln 0.691462461 = 0.368946415; logistic: ln(1 + e^-0.5) = 0.474076984
    s = t(math.sqrt(0.5))
    assert gaussian_bt_loss(t(0.5), s, t(0.0), s, eps=0.0).item() == pytest.approx(0.368946415, abs=1e-9)
    assert bt_loss(t(0.5), t(0.0)).item() == pytest.approx(0.474076984, abs=1e-9)


def test_gaussian_bt_gradient_signs():
    # a correct ranking by a clear margin (z = 2): raising mu_c helps, raising mu_r hurts, more uncertainty hurts
    mu_c, mu_r = t(2.0, grad=True), t(0.0, grad=True)
    sigma_c, sigma_r = t(math.sqrt(0.5), grad=True), t(math.sqrt(0.5), grad=True)
    gaussian_bt_loss(mu_c, sigma_c, mu_r, sigma_r).backward()
    assert mu_c.grad.item() < 0
    assert mu_r.grad.item() > 0
    assert sigma_c.grad.item() > 0 and sigma_r.grad.item() > 0


def test_bt_loss_hand_values():
    # diff 0: ln(1 + e^0) = ln 2 = 0.693147; diff 2: ln(1 + e^-2) = 0.126928
    # diff 2 less margin 1: ln(1 + e^-1) = 0.313262
    assert bt_loss(t(0.0), t(0.0)).item() == pytest.approx(0.693147, abs=1e-6)
    assert bt_loss(t(3.0), t(1.0)).item() == pytest.approx(0.126928, abs=1e-6)
    assert bt_loss(t(3.0), t(1.0), margin=1.0).item() == pytest.approx(0.313262, abs=1e-6)
    # per-pair margins, as TRL reads them from the dataset
    per_pair = bt_loss(t(3.0, 3.0), t(1.0, 1.0), margin=t(0.0, 1.0), reduction="none")
    assert per_pair.tolist() == pytest.approx([0.126928, 0.313262], abs=1e-6)


def test_reductions():
    # per pair: ln 2 = 0.693147 and ln(1 + e^-2) = 0.126928; sum 0.820075, mean 0.410038
    r_c, r_r = t(0.0, 3.0), t(0.0, 1.0)
    assert bt_loss(r_c, r_r, reduction="none").tolist() == pytest.approx([0.693147, 0.126928], abs=1e-6)
    assert bt_loss(r_c, r_r, reduction="sum").item() == pytest.approx(0.820075, abs=1e-6)
    assert bt_loss(r_c, r_r, reduction="mean").item() == pytest.approx(0.410038, abs=1e-6)
    # Gaussian: z = 1 and z = 0 -> 0.172753779 and ln 2 = 0.693147181; sum 0.865900960
    s = t(math.sqrt(0.5), math.sqrt(0.5))
    none = gaussian_bt_loss(t(1.0, 0.0), s, t(0.0, 0.0), s, eps=0.0, reduction="none")
    assert none.shape == (2,)
    assert none.tolist() == pytest.approx([0.172753779, 0.693147181], abs=1e-9)
    assert gaussian_bt_loss(t(1.0, 0.0), s, t(0.0, 0.0), s, eps=0.0, reduction="sum").item() == pytest.approx(
        0.865900960, abs=1e-9)


def test_pairwise_accuracy_counts_ties_as_half():
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4 = 0.625
    assert pairwise_accuracy(t(2.0, 0.0, 1.0, 5.0), t(1.0, 3.0, 1.0, 4.0)) == 0.625
    assert isinstance(pairwise_accuracy(t(1.0), t(0.0)), float)


@pytest.mark.parametrize("call, names", [
    (lambda: gaussian_bt_loss(t(0.0, 1.0), t(1.0), t(0.0), t(1.0)), "sigma_c"),
    (lambda: gaussian_bt_prob(t(0.0), t(1.0), t(0.0, 1.0), t(1.0)), "mu_r"),
    (lambda: gaussian_bt_loss(t(0.0), t(-1.0), t(0.0), t(1.0)), "sigma_c"),
    (lambda: gaussian_bt_loss(t(0.0), t(1.0), t(0.0), t(-0.1)), "sigma_r"),
    (lambda: bt_loss(t(0.0), t(0.0, 1.0)), "r_r"),
    (lambda: bt_loss(t(0.0, 1.0), t(0.0, 1.0), margin=t(1.0)), "margin"),
    (lambda: pairwise_accuracy(t(0.0), t(0.0, 1.0)), "score_r"),
    (lambda: pairwise_accuracy(t(), t()), "score_c"),
    (lambda: bt_loss(t(0.0), t(0.0), reduction="avg"), "'mean', 'sum', 'none'"),
    (lambda: gaussian_bt_loss(t(0.0), t(1.0), t(0.0), t(1.0), reduction="max"), "'mean', 'sum', 'none'"),
])
def test_bad_inputs_name_the_argument(call, names):
    with pytest.raises(ValueError, match=names):
        call()


def test_broadcastable_shapes_are_rejected():
    # (2, 1) against (2,) broadcasts to (2, 2) pairs: must be an error, not four silent pairs
    with pytest.raises(ValueError, match="r_r has shape"):
        bt_loss(torch.zeros(2, 1), torch.zeros(2))
