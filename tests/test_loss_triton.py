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
