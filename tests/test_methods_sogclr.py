"""SogCLR / iSogCLR against dense float64 formulas and the mini-batch InfoNCE (gamma = 1)."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from trainers.losses import contrastive_loss
from trainers.losses.sogclr import ISogCLRLoss, SogCLRLoss, cosine_gamma

TAU = 0.2


def _batch(b: int = 5, t: int = 8, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(t, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randperm(t, generator=g)[:b]   # positives anywhere among the T columns
    return q, k, labels


def _grad(fn, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    loss = fn(q, k)
    loss.backward()
    return loss.detach(), q.grad, k.grad  # type: ignore[return-value]


def _cand_mask(b: int, t: int, labels: torch.Tensor, include_positive: bool) -> torch.Tensor:
    m = torch.ones(b, t, dtype=torch.bool)
    if not include_positive:
        m[torch.arange(b), labels] = False
    return m


def _dcl_rows(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor | float,
              include_positive: bool) -> torch.Tensor:
    """Dense per-row InfoNCE over the candidates: LSE_j(s_ij / tau_i) - s_ii / tau_i."""
    tau = torch.as_tensor(tau, dtype=q.dtype).expand(q.shape[0])
    x = (q @ k.T) / tau[:, None]
    x = x.masked_fill(~_cand_mask(q.shape[0], k.shape[0], labels, include_positive), float("-inf"))
    return torch.logsumexp(x, 1) - x.new_tensor(0) - (q * k[labels]).sum(1) / tau


@pytest.mark.parametrize("include_positive", [False, True])
def test_unimodal_gamma_one_is_tau_times_minibatch_infonce_gradient(include_positive: bool) -> None:
    q, k, labels = _batch()
    loss_fn = SogCLRLoss(20, tau=TAU, gamma=1.0, include_positive=include_positive, block_q=2, block_k=3).double()
    idx = torch.tensor([3, 7, 11, 0, 19])
    if include_positive:
        def ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return TAU * contrastive_loss(q, k, labels, scale=1 / TAU, symmetric=False)
    else:
        def ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return TAU * _dcl_rows(q, k, labels, TAU, False).mean()
    _, gq, gk = _grad(ref, q, k)
    for visit in range(2):   # gamma = 1 holds on every visit, not only the first
        qq = F.normalize(q + 0.1 * visit, dim=1)
        _, gq, gk = _grad(ref, qq, k)
        _, sq, sk = _grad(lambda a, b: loss_fn(a, b, idx, labels), qq, k)
        torch.testing.assert_close(sq, gq, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sk, gk, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("include_positive", [False, True])
def test_bimodal_gamma_one_is_tau_times_symmetric_minibatch_gradient(include_positive: bool) -> None:
    q, k, labels = _batch()
    loss_fn = SogCLRLoss(20, tau=TAU, gamma=1.0, bimodal=True, include_positive=include_positive).double()
    idx = torch.tensor([3, 7, 11, 0, 19])

    def ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if include_positive:
            return TAU * contrastive_loss(q, k, labels, scale=1 / TAU, symmetric=True)
        rows = _dcl_rows(q, k, labels, TAU, False)
        # target side: anchors k[labels], candidates the B queries (own query excluded)
        cols = _dcl_rows(k[labels], q, torch.arange(q.shape[0]), TAU, False)
        return TAU * (rows.mean() + cols.mean()) / 2

    _, gq, gk = _grad(ref, q, k)
    _, sq, sk = _grad(lambda a, b: loss_fn(a, b, idx, labels), q, k)
    torch.testing.assert_close(sq, gq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sk, gk, rtol=1e-10, atol=1e-12)


def _g(anchors: torch.Tensor, cands: torch.Tensor, labels: torch.Tensor, tau: float, d_form: bool) -> torch.Tensor:
    """mean over the candidates (positive excluded) of exp(a_ij): a = s/tau or (s - s_ii)/tau."""
    s = anchors @ cands.T
    a = (s - (anchors * cands[labels]).sum(1, keepdim=True)) / tau if d_form else s / tau
    m = _cand_mask(anchors.shape[0], cands.shape[0], labels, False)
    return (torch.exp(a) * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("bimodal", [False, True])
def test_u_buffer_first_visit_then_moving_average(bimodal: bool) -> None:
    gamma = 0.3
    q, k, labels = _batch()
    idx = torch.tensor([3, 7, 11, 0, 19])
    loss_fn = SogCLRLoss(20, tau=TAU, gamma=gamma, bimodal=bimodal).double()
    assert torch.isnan(loss_fn.normaliser(idx)).all()
    loss_fn(q, k, idx, labels)
    g1 = _g(q, k, labels, TAU, bimodal)
    torch.testing.assert_close(loss_fn.normaliser(idx), g1, rtol=1e-12, atol=0)
    if bimodal:
        g1t = _g(k[labels], q, torch.arange(5), TAU, True)
        torch.testing.assert_close(loss_fn.normaliser(idx, "t"), g1t, rtol=1e-12, atol=0)
    # Second visit of rows 3 and 0 only (plus new rows), with moved embeddings.
    q2 = F.normalize(q + 0.3 * torch.randn_like(q), dim=1)
    idx2 = torch.tensor([3, 1, 2, 0, 4])
    loss_fn(q2, k, idx2, labels)
    g2 = _g(q2, k, labels, TAU, bimodal)
    want = torch.where(torch.tensor([True, False, False, True, False]), (1 - gamma) * g1 + gamma * g2, g2)
    torch.testing.assert_close(loss_fn.normaliser(idx2), want, rtol=1e-12, atol=0)
    # Rows 7, 11, 19 were not in the second batch: untouched.
    torch.testing.assert_close(loss_fn.normaliser(torch.tensor([7, 11, 19])), g1[[1, 2, 4]], rtol=1e-12, atol=0)
    assert int(loss_fn.seen_q.sum()) == 8


@pytest.mark.parametrize("bimodal", [False, True])
def test_gradient_and_value_follow_the_stated_formula(bimodal: bool) -> None:
    """gamma < 1: gradient of mean_i loss_i with p_ij = exp(a_ij)/u_i fixed (dense), value = F_hat."""
    gamma = 0.5
    q, k, labels = _batch()
    idx = torch.arange(5)
    loss_fn = SogCLRLoss(5, tau=TAU, gamma=gamma, bimodal=bimodal, block_q=2, block_k=2).double()
    loss_fn(q, k, idx, labels)                                  # first visit
    q2 = F.normalize(q + 0.3 * torch.randn_like(q), dim=1)
    u_q = (1 - gamma) * _g(q, k, labels, TAU, bimodal) + gamma * _g(q2, k, labels, TAU, bimodal)
    b = q.shape[0]
    if bimodal:
        u_t = (1 - gamma) * _g(k[labels], q, torch.arange(b), TAU, True) + gamma * _g(k[labels], q2, torch.arange(b), TAU, True)

    def side(anchors: torch.Tensor, cands: torch.Tensor, lab: torch.Tensor, u: torch.Tensor, d_form: bool) -> torch.Tensor:
        s = anchors @ cands.T
        pos = (anchors * cands[lab]).sum(1)
        m = _cand_mask(anchors.shape[0], cands.shape[0], lab, False)
        a = (s - pos[:, None]) if d_form else s
        p = (torch.exp(a / TAU) / u[:, None]).detach() * m
        mean_ps = (p * a).sum(1) / m.sum(1)
        return mean_ps if d_form else mean_ps - pos

    def ref(qq: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        rows = side(qq, kk, labels, u_q, bimodal).mean()
        if not bimodal:
            return rows
        return (rows + side(kk[labels], qq, torch.arange(b), u_t, True).mean()) / 2

    _, gq, gk = _grad(ref, q2, k)
    value, sq, sk = _grad(lambda a, c: loss_fn(a, c, idx, labels), q2, k)
    torch.testing.assert_close(sq, gq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sk, gk, rtol=1e-10, atol=1e-12)
    pos = (q2 * k[labels]).sum(1)
    if bimodal:
        f_hat = torch.cat([TAU * torch.log(u_q), TAU * torch.log(u_t)]).mean()
    else:
        f_hat = (TAU * torch.log(u_q) - pos).mean()
    torch.testing.assert_close(value, f_hat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [SogCLRLoss, ISogCLRLoss])
def test_state_dict_round_trip_resumes_identically(cls: type[SogCLRLoss]) -> None:
    q, k, labels = _batch()
    a = cls(20, tau=0.2, gamma=0.6, bimodal=True).double()
    a(q, k, torch.tensor([3, 7, 11, 0, 19]), labels)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = cls(20, tau=0.2, gamma=0.6, bimodal=True).double()
    b.load_state_dict(torch.load(buf))
    q2 = F.normalize(q + 0.2, dim=1)
    idx = torch.tensor([3, 7, 1, 2, 19])
    la, ga, _ = _grad(lambda x, y: a(x, y, idx, labels), q2, k)
    lb, gb, _ = _grad(lambda x, y: b(x, y, idx, labels), q2, k)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_target_valid_and_block_sizes() -> None:
    q, k, labels = _batch(t=9)
    valid = torch.ones(9, dtype=torch.bool)
    free = [j for j in range(9) if j not in labels.tolist()]
    valid[free[0]] = False
    idx = torch.arange(5)
    a = SogCLRLoss(5, tau=TAU, gamma=1.0, block_q=2, block_k=2).double()
    b = SogCLRLoss(5, tau=TAU, gamma=1.0).double()
    la, ga, ka = _grad(lambda x, y: a(x, y, idx, labels, valid), q, k)
    keep = valid.nonzero().squeeze(1)
    remap = torch.full((9,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    lb, gb, kb = _grad(lambda x, y: b(x, y[keep], idx, remap[labels]), q, k)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(ka, kb)


def test_isogclr_temperature_update_and_per_example_gradient() -> None:
    q, k, labels = _batch()
    idx = torch.tensor([3, 7, 11, 0, 19])
    rho, eta, beta = 0.3, 0.05, 0.9
    loss_fn = ISogCLRLoss(20, tau=0.2, gamma=1.0, rho=rho, eta=eta, beta=beta, tau_min=0.05, tau_max=0.7).double()
    taus = torch.tensor([0.1, 0.2, 0.3, 0.05, 0.7], dtype=torch.float64)
    loss_fn.tau_q[idx] = taus
    loss_fn.m_q[idx] = torch.linspace(-1, 1, 5, dtype=torch.float64)
    m_old = loss_fn.m_q[idx].clone()
    # Gradient with gamma = 1: sum_i tau_i * (per-row InfoNCE at tau_i) / B.
    _, gq, gk = _grad(lambda a, b: (taus * _dcl_rows(a, b, labels, taus, False)).mean(), q, k)
    _, sq, sk = _grad(lambda a, b: loss_fn(a, b, idx, labels), q, k)
    torch.testing.assert_close(sq, gq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sk, gk, rtol=1e-10, atol=1e-12)
    # Temperature update, dense: grad_i = log u_i + rho - mean_j p_ij s_ij / tau_i.
    s = q @ k.T
    m = _cand_mask(5, 8, labels, False)
    e = torch.exp(s / taus[:, None]) * m
    u = e.sum(1) / m.sum(1)
    grad = torch.log(u) + rho - ((e / u[:, None]) * s / taus[:, None]).sum(1) / m.sum(1)
    m_new = (1 - beta) * m_old + beta * grad
    torch.testing.assert_close(loss_fn.m_q[idx], m_new, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.tau_q[idx], (taus - eta * m_new).clamp(0.05, 0.7), rtol=1e-10, atol=1e-12)
    assert float(loss_fn.tau_q[1]) == pytest.approx(0.2)


def test_gamma_schedule() -> None:
    loss_fn = SogCLRLoss(4, gamma=0.9, gamma_schedule=lambda e: cosine_gamma(e, n_epochs=10, gamma_min=0.3))
    loss_fn.set_epoch(0)
    assert loss_fn.gamma == 1.0
    loss_fn.set_epoch(5)
    assert loss_fn.gamma == pytest.approx(0.65)
    loss_fn.set_epoch(50)
    assert loss_fn.gamma == pytest.approx(0.3)
    assert cosine_gamma(2.5, n_epochs=10, gamma_min=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_float32_is_stable_at_small_tau() -> None:
    q, k, labels = _batch()
    loss_fn = SogCLRLoss(20, tau=0.01, gamma=0.5, bimodal=True)
    for step in range(3):
        out = loss_fn(q.float(), k.float(), torch.arange(5) + step, labels)
        assert torch.isfinite(out)
    assert torch.isfinite(loss_fn.u_q).all() and float(loss_fn.u_q.max()) <= 1.0 + 1e-6
