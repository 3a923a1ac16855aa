"""Gradient-bias EM loss: unbiased mini-batch gradients at fixed nu (exact, all batches of n=6)."""
from __future__ import annotations

import io
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from trainers.losses.em import GradientBiasEMLoss

N, B, TAU = 6, 3, 0.25


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(N, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(5, 4).double(), x, y


def _emb(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(enc(x), dim=1)


def _flat_grad(enc: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(enc.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def _full_objective(enc: nn.Module, x: torch.Tensor, y: torch.Tensor, log_nu: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i [-s_ii/tau + nu_i mean_{j != i} exp(s_ij/tau) - log nu_i - 1] over the dataset."""
    q, k = _emb(enc, x), _emb(enc, y)
    s = q @ k.T / TAU
    off = ~torch.eye(N, dtype=torch.bool)
    z = (torch.exp(s) * off).sum(1) / (N - 1)
    return (-s.diagonal() + torch.exp(log_nu) * z - log_nu - 1).mean()


def _fixed_nu_loss(log_nu: torch.Tensor) -> GradientBiasEMLoss:
    loss = GradientBiasEMLoss(N, tau=TAU, momentum=0.9, block_q=2, block_k=2).double()
    loss.log_z.copy_(-log_nu)
    loss.seen.fill_(True)
    return loss


def test_expected_minibatch_gradient_equals_full_gradient_at_fixed_nu() -> None:
    enc, x, y = _setup()
    log_nu = torch.linspace(-1.0, 0.7, N, dtype=torch.float64)
    em = _fixed_nu_loss(log_nu)
    batches = [torch.tensor(c) for c in itertools.combinations(range(N), B)]
    grads, values = [], []
    for idx in batches:
        loss = em(_emb(enc, x[idx]), _emb(enc, y[idx]), idx, e_step=False)
        values.append(loss.detach())
        grads.append(_flat_grad(enc, loss))
    assert torch.equal(em.log_z, -log_nu)            # e_step=False left nu alone
    full = _full_objective(enc, x, y, log_nu)
    torch.testing.assert_close(torch.stack(values).mean(), full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(grads).mean(0), _flat_grad(enc, full), rtol=1e-11, atol=1e-13)


def test_plain_minibatch_infonce_gradient_is_biased() -> None:
    """The contrast the method exists for: log of a mini-batch mean is not unbiased."""
    enc, x, y = _setup()

    def dcl(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        s = q @ k.T / TAU
        off = ~torch.eye(q.shape[0], dtype=torch.bool)
        return (torch.logsumexp(s.masked_fill(~off, float("-inf")), 1) - s.diagonal()).mean()

    batches = [list(c) for c in itertools.combinations(range(N), B)]
    mean_grad = torch.stack([_flat_grad(enc, dcl(_emb(enc, x[i]), _emb(enc, y[i]))) for i in batches]).mean(0)
    full_grad = _flat_grad(enc, dcl(_emb(enc, x), _emb(enc, y)))
    assert (mean_grad - full_grad).norm() > 1e-3 * full_grad.norm()
    # ... while the augmented objective at nu = 1/Z (the E-step optimum) has the global gradient.
    q, k = _emb(enc, x), _emb(enc, y)
    with torch.no_grad():
        s = q @ k.T / TAU
        z = (torch.exp(s) * ~torch.eye(N, dtype=torch.bool)).sum(1) / (N - 1)
    torch.testing.assert_close(_flat_grad(enc, _full_objective(enc, x, y, -torch.log(z))), full_grad)


def test_e_step_first_visit_then_running_average_after_the_m_step() -> None:
    enc, x, y = _setup()
    m = 0.75
    em = GradientBiasEMLoss(10, tau=TAU, momentum=m).double()
    idx = torch.tensor([2, 5, 9])

    def g(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        s = q @ k.T / TAU
        off = ~torch.eye(q.shape[0], dtype=torch.bool)
        return (torch.exp(s) * off).sum(1) / (q.shape[0] - 1)

    q1, k1 = _emb(enc, x[:3]).detach(), _emb(enc, y[:3]).detach()
    v1 = em(q1, k1, idx)
    g1 = g(q1, k1)
    torch.testing.assert_close(em.nu[idx], 1 / g1, rtol=1e-12, atol=0)
    # First visit: nu = 1/g, so the value is the decoupled InfoNCE -s_ii/tau + log g_i.
    torch.testing.assert_close(v1, (torch.log(g1) - (q1 * k1).sum(1) / TAU).mean(), rtol=1e-12, atol=1e-12)
    # Second visit: the M-step uses the old nu; the E-step afterwards moves Z towards the new g.
    q2, k2 = _emb(enc, x[3:]).detach(), _emb(enc, y[3:]).detach()
    v2 = em(q2, k2, idx)
    g2 = g(q2, k2)
    want_v2 = (-(q2 * k2).sum(1) / TAU + g2 / g1 + torch.log(g1) - 1).mean()
    torch.testing.assert_close(v2, want_v2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(em.nu[idx], 1 / (m * g1 + (1 - m) * g2), rtol=1e-12, atol=0)
    assert bool(em.seen[idx].all()) and int(em.seen.sum()) == 3
    # Standalone E-step.
    em.e_step(q1, k1, idx)
    torch.testing.assert_close(em.nu[idx], 1 / (m * (m * g1 + (1 - m) * g2) + (1 - m) * g1), rtol=1e-12, atol=0)


def test_state_dict_round_trip() -> None:
    enc, x, y = _setup()
    a = GradientBiasEMLoss(N, tau=TAU).double()
    a(_emb(enc, x[:3]).detach(), _emb(enc, y[:3]).detach(), torch.arange(3))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = GradientBiasEMLoss(N, tau=TAU).double()
    b.load_state_dict(torch.load(buf))
    assert set(a.state_dict()) == {"log_z", "seen"}
    la = a(_emb(enc, x[1:4]), _emb(enc, y[1:4]), torch.arange(1, 4))
    lb = b(_emb(enc, x[1:4]), _emb(enc, y[1:4]), torch.arange(1, 4))
    assert torch.equal(la, lb)
    assert torch.equal(_flat_grad(enc, la), _flat_grad(enc, lb))
