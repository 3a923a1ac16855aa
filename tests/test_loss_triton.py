"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors, small sizes)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest
import torch
import torch.nn.functional as F

from trainers.losses import contrastive_loss, triton_available

triton = pytest.importorskip("triton", reason="triton is not installed")
if not triton_available(torch.device("cpu")):
    pytest.skip("triton cannot run here: set TRITON_INTERPRET=1 before triton is imported",
                allow_module_level=True)

from trainers.losses.triton_kernels import TritonLSE  # noqa: E402

# The interpreter warns on log2(0) / exp2 overflow inside lanes that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
from trainers.losses._common import as_scale, prepare  # noqa: E402
from tests.test_loss_guided import data, other_masks, rel, run  # noqa: E402


def _run(impl: str, q: torch.Tensor, k: torch.Tensor, s: float, col_mode: str = "auto",
         **kw: object) -> list[torch.Tensor]:
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    st = torch.tensor(s, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    if impl == "triton-direct":
        # Direct Function call to reach the exact-column fallback.
        sym = bool(kw.pop("symmetric", True))
        labels = kw.pop("labels", None)
        p = prepare(q, k, labels, symmetric=sym, acc_dtype=torch.float32, query_weight=None,  # type: ignore[arg-type]
                    target_valid=None, query_groups=None, target_groups=None)
        lse = TritonLSE.apply(q, k, as_scale(st, q), p.alpha, p.beta, p.mask, 16, 16, "ieee", col_mode)
        loss = lse - st * (p.pos_coef * (q.float() * k[p.labels].float()).sum(1)).sum()
    else:
        loss = contrastive_loss(q, k, scale=st, impl=impl, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert q.grad is not None and k.grad is not None and st.grad is not None
    return [loss.detach(), q.grad, k.grad, st.grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _data(b: int, t: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    k = F.normalize(torch.randn(t, d, generator=g), dim=1)
    return q, k, torch.randperm(t, generator=g)[:b]


@pytest.mark.parametrize("b,t,d,scale,symmetric", [
    (1, 1, 8, 10.0, True),      # B = 1
    (37, 50, 20, 14.3, True),   # nothing a multiple of 16, hard negatives, D padded
    (33, 33, 16, 100.0, True),  # large logit scale
    (20, 45, 24, 30.0, False),  # one direction
])
def test_triton_fp32_matches_float64(b: int, t: int, d: int, scale: float, symmetric: bool) -> None:
    q, k, labels = _data(b, t, d, b * t)
    ref = _run("naive", q.double(), k.double(), scale, labels=labels, symmetric=symmetric)
    got = _run("triton", q, k, scale, labels=labels, symmetric=symmetric)
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * max(1.0, abs(float(ref[0])))
    for a, r in zip(got[1:], ref[1:]):
        if float(r.norm()) < 1e-9:  # B = T = 1: the loss is identically 0
            assert float(a.norm()) < 1e-4
        else:
            assert _rel(a, r) <= 1e-5


def test_triton_masks_and_duplicates() -> None:
    q, k, labels = _data(30, 40, 16, 7)
    k[3] = q[5]  # duplicate of a query in a negative slot
    g = torch.Generator().manual_seed(8)
    w = torch.rand(30, generator=g) + 0.1
    w[:3] = 0.0
    tv = torch.rand(40, generator=g) > 0.2
    tv[labels] = True
    kw = dict(labels=labels, query_weight=w, target_valid=tv,
              query_groups=torch.randint(-1, 4, (30,), generator=g),
              target_groups=torch.randint(-1, 4, (40,), generator=g))
    ref = _run("naive", q.double(), k.double(), 25.0, **kw)
    got = _run("triton", q, k, 25.0, **kw)
    for a, r in zip(got, ref):
        assert _rel(a, r) <= 1e-5


def test_exact_column_fallback_matches_one_pass() -> None:
    """The exact K x Q column pass and the one-pass atomic column sums agree."""
    q, k, labels = _data(25, 30, 16, 9)
    one = _run("triton-direct", q, k, 40.0, "auto", labels=labels)
    exact = _run("triton-direct", q, k, 40.0, "exact", labels=labels)
    ref = _run("naive", q.double(), k.double(), 40.0, labels=labels)
    for a, b_, r in zip(one, exact, ref):
        assert _rel(a, r) <= 1e-5 and _rel(b_, r) <= 1e-5


def test_column_offsets_survive_extreme_logits() -> None:
    """Scale 1000 on unnormalised rows: offsets must not overflow; fallback keeps it exact."""
    q, k, labels = _data(20, 20, 16, 10)
    q = q * 3.0
    ref = _run("naive", q.double(), k.double(), 1000.0, labels=labels)
    got = _run("triton", q, k, 1000.0, labels=labels)
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, r) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(dtype: torch.dtype) -> None:
    """Half inputs, fp32 accumulation: <= 1e-3 relative error vs float64 of the same values."""
    q, k, labels = _data(40, 48, 32, 11)
    q, k = q.to(dtype), k.to(dtype)
    ref = _run("naive", q.double(), k.double(), 20.0, labels=labels)
    got = _run("triton", q, k, 20.0, labels=labels)
    assert got[1].dtype == dtype
    # fp16 meets 1e-3; bf16 gradients are *returned* in bf16, whose rounding alone is ~2e-3.
    tol = 1e-3 if dtype == torch.float16 else 5e-3
    for a, r in zip(got, ref):
        assert _rel(a, r) <= tol


# -- teacher-guided masking (fixtures from tests/test_loss_guided.py: guide scores exact in fp32,
# so ties are real ties) ----------------------------------------------------------------------


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
