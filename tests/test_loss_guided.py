"""Teacher-guided in-batch masking (GISTEmbed) in the tiled loss, against float64 oracles.

Guide embeddings are small multiples of 1/4, so every guide score is exact in any precision and
summation order: ties with the threshold are real ties, decided by the rule (kept), not by
rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.losses import TiledContrastiveLoss, contrastive_loss
from trainers.losses.reference import naive_contrastive_loss


def by_hand(q, k, labels, s, gq, gk, margin, symmetric):
    """The module doc's rule, one row / column at a time (float64)."""
    x = s * q.double() @ k.double().T
    g = gq.double() @ gk.double().T
    b, t = x.shape
    lab = labels.tolist()
    rows = []
    for i in range(b):
        keep = [j for j in range(t) if j == lab[i] or not g[i, j] > g[i, lab[i]] - margin]
        rows.append(torch.logsumexp(x[i, keep], 0) - x[i, lab[i]])
    loss = torch.stack(rows).mean()
    if not symmetric:
        return loss
    cols = []
    for i in range(b):
        c = lab[i]
        thr = max(float(g[i2, c]) for i2 in range(b) if lab[i2] == c) - margin
        keep = [i2 for i2 in range(b) if lab[i2] == c or not g[i2, c] > thr]
        cols.append(torch.logsumexp(x[keep, c], 0) - x[i, c])
    return (loss + torch.stack(cols).mean()) / 2


def data(b: int, t: int, d: int, gdim: int, seed: int, ties: bool = True):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(t, d, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randperm(t, generator=gen)[:b]
    gq = torch.randint(-2, 3, (b, gdim), generator=gen).double() / 4
    gk = torch.randint(-2, 3, (t, gdim), generator=gen).double() / 4
    if ties:
        # Duplicated positives and queries that are their own targets: exact ties.
        gk[labels[1]] = gk[labels[0]]
        gk[labels[2]] = gq[2]
        if t > b:
            gk[t - 1] = gk[labels[3]]  # a hard-negative column tied with a positive
    return q, k, labels, gq, gk


def other_masks(b: int, t: int, labels, seed: int) -> dict:
    """Zero query weights, padding columns and groups to combine with the guide."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(b, generator=gen, dtype=torch.float64) + 0.1
    w[:2] = 0.0
    tv = torch.rand(t, generator=gen) > 0.2
    tv[labels] = True
    return dict(labels=labels, query_weight=w, target_valid=tv,
                query_groups=torch.randint(-1, 3, (b,), generator=gen),
                target_groups=torch.randint(-1, 3, (t,), generator=gen))


def run(impl: str, q, k, s: float, **kw):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    sc = torch.tensor(s, dtype=q.dtype if q.dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    loss = contrastive_loss(q, k, scale=sc, impl=impl, **kw)
    loss.backward()
    return [loss.detach(), q.grad, k.grad, sc.grad]


def rel(a, b) -> float:
    """Relative error, absolute below norm 1 (an all-masked case has an exactly-zero gradient)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0))


CASES = [  # b, t, margin, symmetric
    (6, 6, 0.0, True),
    (7, 11, 0.0, True),      # extra hard-negative columns
    (7, 11, 0.25, True),     # positive margin: masks ties and more
    (9, 13, -0.25, True),    # negative margin: masks only clearly harder candidates
    (8, 12, 0.0, False),     # one direction
    (5, 9, 0.5, False),
]


@pytest.mark.parametrize("b,t,margin,symmetric", CASES)
def test_reference_follows_the_rule(b, t, margin, symmetric):
    q, k, labels, gq, gk = data(b, t, 5, 3, seed=b * 31 + t)
    got = naive_contrastive_loss(q, k, labels, 7.0, symmetric=symmetric, guide_q=gq, guide_k=gk,
                                 guide_margin=margin)
    torch.testing.assert_close(got, by_hand(q, k, labels, 7.0, gq, gk, margin, symmetric),
                               rtol=1e-12, atol=1e-12)


def test_the_mask_changes_the_loss_and_margin_order():
    """Sanity of the fixtures: masking drops terms (loss goes down), a larger margin more."""
    q, k, labels, gq, gk = data(9, 13, 5, 3, seed=4)
    plain = naive_contrastive_loss(q, k, labels, 7.0)
    losses = [naive_contrastive_loss(q, k, labels, 7.0, guide_q=gq, guide_k=gk, guide_margin=m)
              for m in (-10.0, -0.25, 0.0, 0.25, 10.0)]
    torch.testing.assert_close(losses[0], plain)  # margin -10: nothing is above pos + 10
    assert all(a >= b for a, b in zip(losses, losses[1:])) and losses[-1] < plain
    # margin +10: every negative masked, only the positives are left: loss exactly 0.
    torch.testing.assert_close(losses[-1], torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("b,t,margin,symmetric", CASES)
@pytest.mark.parametrize("blocks", [(2, 3), (4, 5), (64, 64)])
def test_tiled_matches_naive_float64(b, t, margin, symmetric, blocks):
    q, k, labels, gq, gk = data(b, t, 5, 3, seed=b * 17 + t)
    kw = dict(labels=labels, symmetric=symmetric, guide_q=gq, guide_k=gk, guide_margin=margin)
    ref = run("naive", q, k, 9.0, **kw)
    got = run("tiled", q, k, 9.0, block_q=blocks[0], block_k=blocks[1], **kw)
    for a, r in zip(got, ref):
        assert rel(a, r) <= 1e-12


def test_tiled_float32_with_other_masks_matches_float64():
    """Guide plus query weights (zero weights), padding columns and groups; float32 inputs."""
    q, k, labels, gq, gk = data(12, 20, 8, 4, seed=3)
    kw = dict(other_masks(12, 20, labels, seed=5), guide_q=gq, guide_k=gk, guide_margin=0.0)
    ref = run("naive", q, k, 20.0, **kw)
    got = run("tiled", q.float(), k.float(), 20.0, block_q=5, block_k=7,
              **{**kw, "guide_q": gq.float(), "guide_k": gk.float()})
    for a, r in zip(got, ref):
        assert rel(a, r) <= 1e-6


def test_shared_positive_columns():
    """Two queries with the same positive column: the column threshold is the larger of the
    two, and neither is masked from it."""
    q, k, _, gq, gk = data(6, 8, 5, 3, seed=11, ties=False)
    labels = torch.tensor([0, 0, 2, 3, 4, 5])
    kw = dict(labels=labels, guide_q=gq, guide_k=gk, guide_margin=0.0)
    ref = run("naive", q, k, 5.0, **kw)
    torch.testing.assert_close(ref[0], by_hand(q, k, labels, 5.0, gq, gk, 0.0, True))
    got = run("tiled", q, k, 5.0, block_q=2, block_k=3, **kw)
    for a, r in zip(got, ref):
        assert rel(a, r) <= 1e-12


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_masked_rows_are_finite(impl, symmetric):
    """Every negative above the positive: each row keeps only its positive. Loss 0, no NaN."""
    q, k, labels, _, _ = data(6, 9, 5, 3, seed=2, ties=False)
    gq = torch.eye(6, dtype=torch.float64)
    gk = torch.ones(9, 6, dtype=torch.float64)
    gk[labels] = -torch.eye(6, dtype=torch.float64)  # own positive -1, every other pair 0 or 1
    out = run(impl, q, k, 30.0, labels=labels, symmetric=symmetric, guide_q=gq, guide_k=gk,
              **({"block_q": 2, "block_k": 4} if impl == "tiled" else {}))
    for a in out:
        assert torch.isfinite(a).all()
    assert float(out[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(out[1].abs().max()) == pytest.approx(0.0, abs=1e-12)
    assert float(out[2].abs().max()) == pytest.approx(0.0, abs=1e-12)


def test_module_and_argument_checks():
    q, k, labels, gq, gk = data(6, 9, 5, 3, seed=6)
    m = TiledContrastiveLoss(temperature=0.1, guide_margin=0.25, block_q=4, block_k=4)
    torch.testing.assert_close(
        m(q, k, labels, guide_q=gq, guide_k=gk),
        naive_contrastive_loss(q, k, labels, 10.0, guide_q=gq, guide_k=gk, guide_margin=0.25))
    with pytest.raises(ValueError, match="both guide_q and guide_k"):
        contrastive_loss(q, k, labels, 1.0, guide_q=gq)
    with pytest.raises(ValueError, match="guide_k T=9"):
        contrastive_loss(q, k, labels, 1.0, guide_q=gq, guide_k=gk[:6])
    with pytest.raises(ValueError, match="finite"):
        contrastive_loss(q, k, labels, 1.0, guide_q=gq, guide_k=gk, guide_margin=float("nan"))


def test_ring_refuses_the_guide():
    from trainers.losses.ring import ring_contrastive_loss

    q, k, labels, gq, gk = data(6, 9, 5, 3, seed=6)
    with pytest.raises(ValueError, match="does not support guide"):
        ring_contrastive_loss(q, k, labels, 1.0, guide_q=gq, guide_k=gk)
