"""Teacher-guided masking in the Triton kernels, under the interpreter (TRITON_INTERPRET=1, CPU
tensors, small sizes), against the float64 naive reference. Fixtures: tests/test_loss_guided.py
(guide scores exact in fp32, so ties are real ties)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest
import torch

from trainers.losses import triton_available

triton = pytest.importorskip("triton", reason="triton is not installed")
if not triton_available(torch.device("cpu")):
    pytest.skip("triton cannot run here: set TRITON_INTERPRET=1 before triton is imported",
                allow_module_level=True)

from tests.test_loss_guided import data, other_masks, rel, run  # noqa: E402

# The interpreter warns on log2(0) / exp2 overflow inside lanes that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("b,t,margin,symmetric", [
    (20, 20, 0.0, True),
    (21, 37, 0.0, True),     # hard negatives, nothing a multiple of 16
    (21, 37, 0.25, True),
    (18, 30, -0.25, False),  # one direction
])
def test_triton_guided_matches_float64(b, t, margin, symmetric):
    q, k, labels, gq, gk = data(b, t, 12, 5, seed=b + t)
    kw = dict(labels=labels, symmetric=symmetric, guide_margin=margin)
    ref = run("naive", q, k, 20.0, guide_q=gq, guide_k=gk, **kw)
    got = run("triton", q.float(), k.float(), 20.0, guide_q=gq.float(), guide_k=gk.float(), **kw)
    for a, r in zip(got, ref):
        assert rel(a, r) <= 1e-5
    unmasked = run("naive", q, k, 20.0, **kw)
    assert float(unmasked[0]) > float(ref[0]) + 1e-3  # the guide really masked something


def test_triton_exact_column_pass_applies_the_column_rule():
    from trainers.losses._common import as_scale, prepare
    from trainers.losses.triton_kernels import TritonLSE

    q, k, labels, gq, gk = data(21, 30, 12, 5, seed=9)
    ref = run("naive", q, k, 15.0, labels=labels, guide_q=gq, guide_k=gk)
    qf, kf = q.float().requires_grad_(), k.float().requires_grad_()
    p = prepare(qf, kf, labels, symmetric=True, query_weight=None, target_valid=None,
                query_groups=None, target_groups=None, acc_dtype=torch.float32,
                guide_q=gq.float(), guide_k=gk.float())
    s = as_scale(15.0, qf)
    lse = TritonLSE.apply(qf, kf, s, p.alpha, p.beta, p.mask, 16, 16, "ieee", "exact")
    loss = lse - s * (p.pos_coef * (qf * kf[p.labels]).sum(1)).sum()
    loss.backward()
    assert rel(loss.detach(), ref[0]) <= 1e-5
    assert rel(qf.grad, ref[1]) <= 1e-5 and rel(kf.grad, ref[2]) <= 1e-5


def test_triton_guided_with_other_masks_and_exact_columns():
    """Guide + zero weights + padding + groups; the exact K x Q column pass (forced by extreme
    logits on unnormalised rows) applies the column rule too."""
    q, k, labels, gq, gk = data(20, 28, 8, 4, seed=3)
    kw = dict(other_masks(20, 28, labels, seed=5), guide_margin=0.0)
    for scale, mult in ((20.0, 1.0), (1000.0, 3.0)):
        qq = q * mult
        ref = run("naive", qq, k, scale, guide_q=gq, guide_k=gk, **kw)
        got = run("triton", qq.float(), k.float(), scale, guide_q=gq.float(),
                  guide_k=gk.float(), **kw)
        for a, r in zip(got, ref):
            assert torch.isfinite(a).all()
            assert rel(a, r) <= 1e-4


def test_triton_all_masked_rows_are_finite():
    q, k, labels, _, _ = data(16, 20, 8, 3, seed=2, ties=False)
    gq = torch.eye(16)
    gk = torch.ones(20, 16)
    gk[labels] = -torch.eye(16)
    out = run("triton", q.float(), k.float(), 30.0, labels=labels, guide_q=gq, guide_k=gk)
    for a in out:
        assert torch.isfinite(a).all()
    assert abs(float(out[0])) < 1e-5 and float(out[1].abs().max()) < 1e-5
