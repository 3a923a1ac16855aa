"""Reference and pure-torch tiled loss against float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.losses import TiledContrastiveLoss, contrastive_loss
from trainers.losses.reference import naive_contrastive_loss


def _grads(impl: str, q: torch.Tensor, k: torch.Tensor, s: float, **kw: object) -> list[torch.Tensor]:
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    st_ = torch.tensor(s, dtype=q.dtype if q.dtype == torch.float64 else torch.float32, requires_grad=True)
    loss = contrastive_loss(q, k, scale=st_, impl=impl, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert q.grad is not None and k.grad is not None and st_.grad is not None
    return [loss.detach(), q.grad, k.grad, st_.grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_reference_is_clip_loss() -> None:
    """Symmetric, T = B, no masks: exactly open_clip's (CE(X) + CE(X^T)) / 2."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    x = 3.0 * q @ k.T
    y = torch.arange(7)
    clip = (F.cross_entropy(x, y) + F.cross_entropy(x.T, y)) / 2
    torch.testing.assert_close(naive_contrastive_loss(q, k, scale=3.0), clip)
    torch.testing.assert_close(naive_contrastive_loss(q, k, scale=3.0, symmetric=False), F.cross_entropy(x, y))


def test_reference_hard_negatives_and_column_direction() -> None:
    """Extra targets only enlarge row denominators; the column loss runs over queries."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([5, 0, 8, 2])
    x = q @ k.T
    row = F.cross_entropy(x, labels)
    col = torch.stack([torch.logsumexp(x[:, c], 0) - x[i, c] for i, c in enumerate(labels.tolist())]).mean()
    torch.testing.assert_close(naive_contrastive_loss(q, k, labels), (row + col) / 2)


def test_reference_masks() -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    tv = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    qg = torch.tensor([0, 1, 0, -1])
    tg = torch.tensor([0, 1, 0, 2, 3, -1])
    x = q @ k.T
    valid = tv[None, :].expand(4, 6).clone()
    valid &= ~((qg[:, None] == tg[None, :]) & (qg[:, None] >= 0) & (torch.arange(6)[None, :] != torch.arange(4)[:, None]))
    xr = x.masked_fill(~valid, -math.inf)
    xc = xr.masked_fill(~(w > 0)[:, None], -math.inf)
    per = [0.5 * (torch.logsumexp(xr[i], 0) + torch.logsumexp(xc[:, i], 0)) - x[i, i] for i in range(4)]
    expect = sum(w[i] * per[i] for i in range(4) if w[i] > 0) / w.sum()
    got = naive_contrastive_loss(q, k, query_weight=w, target_valid=tv, query_groups=qg, target_groups=tg)
    torch.testing.assert_close(got, expect)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 9), extra=st.integers(0, 6), d=st.integers(1, 5), bq=st.integers(1, 4),
    bk=st.integers(1, 5), symmetric=st.booleans(), masks=st.booleans(), seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1.0, 20.0, 100.0]),
)
def test_tiled_matches_naive_float64(
    b: int, extra: int, d: int, bq: int, bk: int, symmetric: bool, masks: bool, seed: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    t = b + extra
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    k = torch.randn(t, d, generator=g, dtype=torch.float64)
    k[0] = q[-1]  # duplicate rows: the loss must stay exact when a negative equals a positive
    labels = torch.randperm(t, generator=g)[:b]
    kw: dict[str, object] = dict(labels=labels, symmetric=symmetric)
    if masks:
        w = torch.rand(b, generator=g, dtype=torch.float64)
        w[0] = 1.0
        if b > 1:
            w[1] = 0.0
        tv = torch.rand(t, generator=g) > 0.3
        tv[labels] = True
        kw.update(query_weight=w, target_valid=tv, query_groups=torch.randint(-1, 3, (b,), generator=g),
                  target_groups=torch.randint(-1, 3, (t,), generator=g))
    ref = _grads("naive", q, k, scale, **kw)
    got = _grads("tiled", q, k, scale, block_q=bq, block_k=bk, **kw)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b,t,scale", [(1, 3, 10.0), (1, 5, 100.0), (333, 333, 100.0), (257, 400, 14.3)])
def test_tiled_fp32_gradient_error(b: int, t: int, scale: float) -> None:
    """fp32 inputs on CPU: relative error vs float64 <= 1e-6 for loss, dQ, dK and d scale."""
    g = torch.Generator().manual_seed(b + t)
    q = F.normalize(torch.randn(b, 64, generator=g), dim=1)
    k = F.normalize(torch.randn(t, 64, generator=g), dim=1)
    labels = torch.randperm(t, generator=g)[:b]
    ref = _grads("naive", q.double(), k.double(), scale, labels=labels)
    got = _grads("tiled", q, k, scale, labels=labels, block_q=64, block_k=96)  # b, t not multiples
    for a, r in zip(got, ref):
        assert _rel(a, r) <= 1e-6


def test_all_duplicate_rows() -> None:
    """Every query equal: all logits tie; gradients must still match (no nan, exact LSEs)."""
    q = torch.ones(6, 4, dtype=torch.float64)
    ref = _grads("naive", q, q, 50.0)
    got = _grads("tiled", q, q, 50.0, block_q=4, block_k=4)
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r)


def test_module_learnable_scale_and_clamp() -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(10, 8, generator=g), torch.randn(12, 8, generator=g)
    m = TiledContrastiveLoss(temperature=0.05, learnable=True, impl="tiled", block_q=3, block_k=5)
    loss = m(q, k)
    loss.backward()
    ref_s = torch.tensor(math.log(20.0), requires_grad=True)
    ref = naive_contrastive_loss(q.double(), k.double(), scale=ref_s.double().exp())
    ref.backward()
    assert m.log_scale.grad is not None and ref_s.grad is not None
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.log_scale.grad.double(), ref_s.grad.double(), rtol=1e-5, atol=1e-6)
    fixed = TiledContrastiveLoss(temperature=0.001)  # scale 1000 clamps to max_scale=100
    assert float(fixed.scale) == 100.0 and not any(p.requires_grad for p in fixed.parameters())


def test_half_inputs_on_cpu_tiled() -> None:
    """bf16 inputs: the tiled path accumulates in fp32; compare to float64 of the same values."""
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(40, 16, generator=g), dim=1).bfloat16()
    k = F.normalize(torch.randn(50, 16, generator=g), dim=1).bfloat16()
    ref = _grads("naive", q.double(), k.double(), 20.0)
    got = _grads("tiled", q, k, 20.0, block_q=16, block_k=16)
    assert got[1].dtype == torch.bfloat16
    assert _rel(got[0], ref[0]) < 1e-5
    for a, r in zip(got[1:3], ref[1:3]):
        assert _rel(a, r) < 1e-2  # bf16 rounding of the returned gradient itself


def test_errors() -> None:
    q, k = torch.randn(4, 3), torch.randn(3, 3)
    with pytest.raises(ValueError, match="at least"):
        contrastive_loss(q, k)
    with pytest.raises(ValueError, match="out of range"):
        contrastive_loss(q, torch.randn(5, 3), labels=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="sums to zero"):
        contrastive_loss(q, q, query_weight=torch.zeros(4))
    with pytest.raises(ValueError, match="invalid"):
        contrastive_loss(q, q, target_valid=torch.tensor([True, False, True, True]))
    with pytest.raises(ValueError, match="both"):
        contrastive_loss(q, q, query_groups=torch.zeros(4, dtype=torch.long))


def test_functional_and_module_defaults_agree():
    """contrastive_loss(q, k) trains at the documented temperature 0.07, as the module does."""
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
    expected = naive_contrastive_loss(q, k, scale=1 / 0.07)
    torch.testing.assert_close(contrastive_loss(q, k), expected)
    torch.testing.assert_close(TiledContrastiveLoss()(q, k).double(), expected)
