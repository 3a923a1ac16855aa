"""Fused Triton backend (CUDA; CPU under ``TRITON_INTERPRET=1`` for tests).

Three launches of two kernels, both written for a generic "A side x B side" tile so the same
code serves Q x K and the transposed K x Q problem:

* ``_lse_fwd_kernel`` (A=Q): one program per BLOCK_M query rows streams the target blocks;
  ``X = s Q K^T`` from ``tl.dot`` with fp32 accumulation, base-2 online LSE per row. When the
  loss is symmetric the *same tile* also feeds the column sums: ``sum_i 2^(x_ij - o_j)`` is
  atomically added into a (T,) fp32 buffer, with a fixed per-column offset ``o_j`` chosen on
  the host so the sum can neither overflow (``o_j >= ub_j - 60``, ``ub_j = |s| max|q| |k_j|``
  bounds every logit of the column) nor, in practice, underflow (``o_j <= positive logit`` of
  the column, whose term is then >= 1). Columns whose sum still fails the check are recomputed
  exactly by the same kernel on K x Q (online LSE, no offsets).
* ``_lse_bwd_kernel`` recomputes tiles and accumulates
  ``dA += G B`` with ``G_ab = wA_a 2^(x - lseA_a) + wB_b 2^(x - lseB_b)`` (0 on masked pairs),
  launched as (A=Q, B=K) for dQ and (A=K, B=Q) for dK; no atomics, deterministic.

Flops for a symmetric fwd+bwd: 2 (fwd) + 4 (dQ) + 4 (dK) = 10 B T d against the 8 B T d
minimum. fp16/bf16 inputs go to the tensor cores directly; fp32 inputs use TF32 by default
(``precision="ieee"`` for exact fp32). ``G`` is cast to the input dtype before its dot; it is
pre-multiplied by ``2^14 / max|w|`` so fp16 keeps probabilities far from its subnormal range.

>>> import os, torch
>>> os.environ.get("TRITON_INTERPRET") in (None, "0", "1")
True
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import PairMask
from .tiled import weighted_lse_sum

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_G_SCALE = 16384.0  # 2^14: G in fp16 stays well above its subnormal range, far below 65504
_OFFSET_HEADROOM = 60.0  # natural-log units: B * e^60 fits fp32 for B up to ~3e12


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _valid_tile(
    rows, cols, n_rows, n_cols, ROW_OK, COL_OK, RG, CG, LAB,
    HAS_ROW_OK: tl.constexpr, HAS_COL_OK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    LABEL_ON_ROWS: tl.constexpr,
):
    rin = rows < n_rows
    cin = cols < n_cols
    v = rin[:, None] & cin[None, :]
    if HAS_ROW_OK:
        ro = tl.load(ROW_OK + rows, mask=rin, other=0)
        v = v & (ro[:, None] != 0)
    if HAS_COL_OK:
        co = tl.load(COL_OK + cols, mask=cin, other=0)
        v = v & (co[None, :] != 0)
    if HAS_GROUPS:
        rg = tl.load(RG + rows, mask=rin, other=-1)
        cg = tl.load(CG + cols, mask=cin, other=-2)
        same = (rg[:, None] == cg[None, :]) & (rg[:, None] >= 0)
        # The query's own positive is never a false negative.
        if LABEL_ON_ROWS:
            lab = tl.load(LAB + rows, mask=rin, other=-1)
            same = same & (cols[None, :] != lab[:, None])
        else:
            lab = tl.load(LAB + cols, mask=cin, other=-1)
            same = same & (rows[:, None] != lab[None, :])
        v = v & (same == 0)
    return v


@triton.jit
def _load_rows(PTR, rows, n_rows, stride, DIM, BLOCK: tl.constexpr):
    """A (len(rows), BLOCK) block of a row-major matrix, zero past n_rows and DIM."""
    offs = tl.arange(0, BLOCK)
    return tl.load(PTR + rows[:, None].to(tl.int64) * stride + offs[None, :],
                   mask=(rows < n_rows)[:, None] & (offs < DIM)[None, :], other=0.0)


@triton.jit
def _valid_pairs(
    rows, cols, n_rows, n_cols, ROW_OK, COL_OK, RG, CG, LAB,
    ga, GB, THR_A, THR_B, G_DIM, stride_gb,
    HAS_ROW_OK: tl.constexpr, HAS_COL_OK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    LABEL_ON_ROWS: tl.constexpr, HAS_GUIDE: tl.constexpr, BLOCK_G: tl.constexpr,
    GPREC: tl.constexpr,
):
    """Valid pairs of one tile for the A-side LSEs and for the B-side LSEs.

    They differ only under teacher-guided masking: ``ga`` is the resident A block of guide
    embeddings, the B block is loaded here, and a pair is dropped from the A side's LSE when
    its guide score exceeds THR_A of its row (from the B side's: THR_B of its column), unless
    it is the query's own positive."""
    valid = _valid_tile(rows, cols, n_rows, n_cols, ROW_OK, COL_OK, RG, CG, LAB,
                        HAS_ROW_OK, HAS_COL_OK, HAS_GROUPS, LABEL_ON_ROWS)
    valid_a = valid
    valid_b = valid
    if HAS_GUIDE:
        rin = rows < n_rows
        cin = cols < n_cols
        gs = tl.dot(ga, tl.trans(_load_rows(GB, cols, n_cols, stride_gb, G_DIM, BLOCK_G)),
                    input_precision=GPREC)
        if LABEL_ON_ROWS:
            lab = tl.load(LAB + rows, mask=rin, other=-1)
            other = cols[None, :] != lab[:, None]
        else:
            lab = tl.load(LAB + cols, mask=cin, other=-1)
            other = rows[:, None] != lab[None, :]
        thr_a = tl.load(THR_A + rows, mask=rin, other=float("inf"))
        thr_b = tl.load(THR_B + cols, mask=cin, other=float("inf"))
        valid_a = valid & (((gs > thr_a[:, None]) & other) == 0)
        valid_b = valid & (((gs > thr_b[None, :]) & other) == 0)
    return valid_a, valid_b


@triton.jit
def _lse_fwd_kernel(
    A, Bm, SCALE, LSE_A, COL_SUM, COL_OFF,
    ROW_OK, COL_OK, RG, CG, LAB,
    GA, GB, THR_A, THR_B, G_DIM, stride_ga, stride_gb,
    n_a, n_b, D, stride_a, stride_b,
    HAS_ROW_OK: tl.constexpr, HAS_COL_OK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    LABEL_ON_ROWS: tl.constexpr, DO_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_GUIDE: tl.constexpr, BLOCK_G: tl.constexpr, GPREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rin = rows < n_a
    # The A block stays resident for the whole sweep; only B blocks stream.
    a = tl.load(A + rows[:, None].to(tl.int64) * stride_a + offs_d[None, :],
                mask=rin[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong, so feed fp32
        a = a.to(tl.float32)
    s2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634  # base-2 logits: exp2 is the fast path
    ga = 0.0
    if HAS_GUIDE:
        ga = _load_rows(GA, rows, n_a, stride_ga, G_DIM, BLOCK_G)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cin = cols < n_b
        b = tl.load(Bm + cols[:, None].to(tl.int64) * stride_b + offs_d[None, :],
                    mask=cin[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            b = b.to(tl.float32)
        x = tl.dot(a, tl.trans(b), input_precision=PRECISION) * s2
        valid_a, valid_b = _valid_pairs(
            rows, cols, n_a, n_b, ROW_OK, COL_OK, RG, CG, LAB, ga, GB, THR_A, THR_B, G_DIM,
            stride_gb, HAS_ROW_OK, HAS_COL_OK, HAS_GROUPS, LABEL_ON_ROWS, HAS_GUIDE, BLOCK_G,
            GPREC)
        xa = tl.where(valid_a, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(xa, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(xa - m_use[:, None]), 1)
        m_i = m_new
        if DO_COL:
            off = tl.load(COL_OFF + cols, mask=cin, other=0.0)
            xb = tl.where(valid_b, x, float("-inf"))
            tl.atomic_add(COL_SUM + cols, tl.sum(tl.exp2(xb - off[None, :]), 0), mask=cin)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(LSE_A + rows, lse, mask=rin)


@triton.jit
def _lse_bwd_kernel(
    A, Bm, SCALE, LSE_A, LSE_B, W_A, W_B, DA,
    ROW_OK, COL_OK, RG, CG, LAB,
    GA, GB, THR_A, THR_B, G_DIM, stride_ga, stride_gb,
    n_a, n_b, D, stride_a, stride_b, stride_da,
    HAS_ROW_OK: tl.constexpr, HAS_COL_OK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    LABEL_ON_ROWS: tl.constexpr, TERM_A: tl.constexpr, TERM_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_GUIDE: tl.constexpr, BLOCK_G: tl.constexpr, GPREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rin = rows < n_a
    a = tl.load(A + rows[:, None].to(tl.int64) * stride_a + offs_d[None, :],
                mask=rin[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong, so feed fp32
        a = a.to(tl.float32)
    s2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    ga = 0.0
    if HAS_GUIDE:
        ga = _load_rows(GA, rows, n_a, stride_ga, G_DIM, BLOCK_G)
    if TERM_A:
        lse_a = tl.load(LSE_A + rows, mask=rin, other=0.0)
        w_a = tl.load(W_A + rows, mask=rin, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cin = cols < n_b
        b = tl.load(Bm + cols[:, None].to(tl.int64) * stride_b + offs_d[None, :],
                    mask=cin[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            b = b.to(tl.float32)
        x = tl.dot(a, tl.trans(b), input_precision=PRECISION) * s2
        valid_a, valid_b = _valid_pairs(
            rows, cols, n_a, n_b, ROW_OK, COL_OK, RG, CG, LAB, ga, GB, THR_A, THR_B, G_DIM,
            stride_gb, HAS_ROW_OK, HAS_COL_OK, HAS_GROUPS, LABEL_ON_ROWS, HAS_GUIDE, BLOCK_G,
            GPREC)
        # where(), not a product: fully masked rows/columns have lse = -inf (inf * 0 = nan).
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if TERM_A:
            g += tl.where(valid_a, w_a[:, None] * tl.exp2(x - lse_a[:, None]), 0.0)
        if TERM_B:
            lse_b = tl.load(LSE_B + cols, mask=cin, other=0.0)
            w_b = tl.load(W_B + cols, mask=cin, other=0.0)
            g += tl.where(valid_b, w_b[None, :] * tl.exp2(x - lse_b[None, :]), 0.0)
        acc = tl.dot(g.to(b.dtype), b, acc, input_precision=PRECISION)
    tl.store(DA + rows[:, None].to(tl.int64) * stride_da + offs_d[None, :], acc,
             mask=rin[:, None] & dmask[None, :])


def _configs(d: int, block_q: int | None, block_k: int | None) -> dict[str, Any]:
    """Tile shapes. Hopper guess (unmeasured): 128x128 tiles with 8 warps while the resident
    A block and a streamed B block fit shared memory; smaller M for wide embeddings."""
    bd = max(16, triton.next_power_of_2(d))
    if _interpret():
        bm, bn, warps, stages = 16, 16, 1, 1
    elif bd <= 128:
        bm, bn, warps, stages = 128, 128, 8, 3
    elif bd <= 256:
        bm, bn, warps, stages = 128, 64, 8, 2
    else:
        bm, bn, warps, stages = 64, 64, 8, 2
    return dict(BLOCK_M=block_q or bm, BLOCK_N=block_k or bn, BLOCK_D=bd,
                num_warps=warps, num_stages=stages)


def _dot_f32(dtype: torch.dtype) -> bool:
    return _interpret() and dtype == torch.bfloat16


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    if precision is not None:
        return precision
    return "tf32" if dtype == torch.float32 and not _interpret() else "ieee"


class _Side:
    """Mask pointers of one launch orientation (A = rows of the tile)."""

    def __init__(self, mask: PairMask, transposed: bool, dummy: Tensor) -> None:
        ok_q = None if mask.row_ok is None else mask.row_ok.to(torch.int8)
        ok_k = None if mask.col_ok is None else mask.col_ok.to(torch.int8)
        rok, cok = (ok_k, ok_q) if transposed else (ok_q, ok_k)
        rg, cg = (mask.t_groups, mask.q_groups) if transposed else (mask.q_groups, mask.t_groups)
        has_g = rg is not None and cg is not None
        self.ptrs = (
            dummy if rok is None else rok, dummy if cok is None else cok,
            rg if has_g else dummy, cg if has_g else dummy, mask.labels,
        )
        self.flags = dict(HAS_ROW_OK=rok is not None, HAS_COL_OK=cok is not None,
                          HAS_GROUPS=has_g, LABEL_ON_ROWS=not transposed)
        g = mask.guide
        fdummy = dummy.float()
        if g is None:
            self.guide: tuple[Any, ...] = (fdummy, fdummy, fdummy, fdummy, 0, 0, 0)
            self.flags.update(HAS_GUIDE=False, BLOCK_G=16, GPREC="ieee")
            return
        # Guide scores in fp32 (exact under the interpreter, TF32 on GPU like the logits).
        gq, gk = g.gq.float().contiguous(), g.gk.float().contiguous()
        thr_r = g.thr_r.float().contiguous()
        thr_c = (torch.full((gk.shape[0],), float("inf"), device=gk.device)
                 if g.thr_c is None else g.thr_c.float().contiguous())
        ga, gb, ta, tb = (gk, gq, thr_c, thr_r) if transposed else (gq, gk, thr_r, thr_c)
        self.guide = (ga, gb, ta, tb, ga.shape[1], ga.stride(0), gb.stride(0))
        self.flags.update(HAS_GUIDE=True, BLOCK_G=max(16, triton.next_power_of_2(ga.shape[1])),
                          GPREC="ieee" if _interpret() else "tf32")


def triton_lse(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    mask: PairMask,
    beta: Tensor | None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    precision: str | None = None,
    col_mode: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Row LSEs (B,) and, when ``beta`` is given, column LSEs (T,), natural log, fp32."""
    q, k = q.contiguous(), k.contiguous()
    b, t, d = q.shape[0], k.shape[0], q.shape[1]
    cfg = _configs(d, block_q, block_k)
    prec = _precision(q.dtype, precision)
    sf = s.detach().to(device=q.device, dtype=torch.float32).reshape(1)
    dummy = torch.zeros(1, dtype=torch.int8, device=q.device)
    fwd = _Side(mask, False, dummy)
    lse_r = torch.empty(b, dtype=torch.float32, device=q.device)
    do_col = beta is not None and col_mode == "auto"
    col_sum = col_off = torch.zeros(1, dtype=torch.float32, device=q.device)
    if do_col:
        assert beta is not None
        # Offsets (see module doc): never overflow; >= the column's positive logit when possible.
        qn = q.float().norm(dim=1).max() if b else torch.zeros((), device=q.device)
        ub = sf.abs() * qn * k.float().norm(dim=1)
        # Labels outside [0, T) mean "positive not in this block" (ring steps).
        has = (mask.labels >= 0) & (mask.labels < t)
        lab = mask.labels.clamp(0, max(t - 1, 0))
        pos = sf * (q.float() * k[lab].float()).sum(1)
        if mask.row_ok is not None:
            has = has & mask.row_ok
        pos = pos.masked_fill(~has, float("-inf"))
        posmax = torch.full((t,), float("-inf"), device=q.device).scatter_reduce(
            0, lab, pos, reduce="amax")
        off = torch.where(beta != 0, torch.maximum(posmax, ub - _OFFSET_HEADROOM), ub)
        col_off = (off * LOG2E).contiguous()
        col_sum = torch.zeros(t, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]),)
    _lse_fwd_kernel[grid](
        q, k, sf, lse_r, col_sum, col_off, *fwd.ptrs, *fwd.guide, b, t, d, q.stride(0), k.stride(0),
        DO_COL=do_col, PRECISION=prec, DOT_F32=_dot_f32(q.dtype), **fwd.flags, **cfg,
    )
    lse_r = lse_r * LN2
    lse_c: Tensor | None = None
    if beta is not None:
        need_exact = not do_col
        if do_col:
            lse_c = off + torch.log(col_sum)
            used = beta != 0
            bad = used & ~(torch.isfinite(col_sum) & (col_sum > 1e-30))
            need_exact = bool(bad.any())
        if need_exact:
            # Exact online LSE over K x Q: same kernel, transposed roles.
            bwd = _Side(mask, True, dummy)
            lc2 = torch.empty(t, dtype=torch.float32, device=q.device)
            _lse_fwd_kernel[(triton.cdiv(t, cfg["BLOCK_M"]),)](
                k, q, sf, lc2, col_sum, col_off, *bwd.ptrs, *bwd.guide, t, b, d, k.stride(0), q.stride(0),
                DO_COL=False, PRECISION=prec, DOT_F32=_dot_f32(q.dtype), **bwd.flags, **cfg,
            )
            lse_c = lc2 * LN2
    return lse_r, lse_c


def triton_grad(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    w_r: Tensor,
    lse_r: Tensor,
    w_c: Tensor | None,
    lse_c: Tensor | None,
    mask: PairMask,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Unscaled ``(G K, G^T Q)`` in fp32 via the recomputing dQ and dK launches."""
    q, k = q.contiguous(), k.contiguous()
    b, t, d = q.shape[0], k.shape[0], q.shape[1]
    cfg = _configs(d, block_q, block_k)
    prec = _precision(q.dtype, precision)
    sf = s.detach().to(device=q.device, dtype=torch.float32).reshape(1)
    dummy = torch.zeros(1, dtype=torch.int8, device=q.device)
    sym = w_c is not None and lse_c is not None
    wmax = w_r.abs().max() if b else torch.zeros((), device=q.device)
    if sym:
        assert w_c is not None
        wmax = torch.maximum(wmax, w_c.abs().max())
    c = _G_SCALE / float(wmax) if float(wmax) > 0 else 1.0
    wr = (w_r.float() * c).contiguous()
    wc = (w_c.float() * c).contiguous() if sym and w_c is not None else wr
    # Zero-weight rows/columns may hold -inf or offset-approximate LSEs; +inf makes their
    # exp2 exactly 0 instead of 0 * inf = nan.
    inf = torch.tensor(float("inf"), device=q.device)
    lr2 = torch.where(wr != 0, lse_r.float() * LOG2E, inf).contiguous()
    lc2 = lr2
    if sym and lse_c is not None:
        lc2 = torch.where(wc != 0, lse_c.float() * LOG2E, inf).contiguous()
    dq = torch.empty(b, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(t, d, dtype=torch.float32, device=q.device)
    f = _Side(mask, False, dummy)
    _lse_bwd_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
        q, k, sf, lr2, lc2, wr, wc, dq, *f.ptrs, *f.guide, b, t, d, q.stride(0), k.stride(0), dq.stride(0),
        TERM_A=True, TERM_B=sym, PRECISION=prec, DOT_F32=_dot_f32(q.dtype), **f.flags, **cfg,
    )
    tr = _Side(mask, True, dummy)
    _lse_bwd_kernel[(triton.cdiv(t, cfg["BLOCK_M"]),)](
        k, q, sf, lc2, lr2, wc, wr, dk, *tr.ptrs, *tr.guide, t, b, d, k.stride(0), q.stride(0), dk.stride(0),
        TERM_A=sym, TERM_B=True, PRECISION=prec, DOT_F32=_dot_f32(q.dtype), **tr.flags, **cfg,
    )
    return dq / c, dk / c


class TritonLSE(torch.autograd.Function):
    """Triton counterpart of :class:`trainers.losses.tiled.TiledLSE` (same inputs and output)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, s: Tensor, alpha: Tensor, beta: Tensor | None,
        mask: PairMask, block_q: int | None, block_k: int | None,
        precision: str | None = None, col_mode: str = "auto",
    ) -> Tensor:
        lse_r, lse_c = triton_lse(q, k, s, mask, beta, block_q=block_q, block_k=block_k,
                                  precision=precision, col_mode=col_mode)
        ctx.save_for_backward(q, k, s, alpha, beta, lse_r, lse_c)
        ctx.mask, ctx.cfg = mask, (block_q, block_k, precision)
        return weighted_lse_sum(alpha.float(), lse_r, None if beta is None else beta.float(), lse_c)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, s, alpha, beta, lse_r, lse_c = ctx.saved_tensors
        bq, bk, prec = ctx.cfg
        g = g.float()
        dq, dk = triton_grad(q, k, s, g * alpha, lse_r, None if beta is None else g * beta,
                             lse_c, ctx.mask, block_q=bq, block_k=bk, precision=prec)
        ds = (q.float() * dq).sum() if ctx.needs_input_grad[2] else None
        sf = s.detach().float()
        return (
            (sf * dq).to(q.dtype), (sf * dk).to(k.dtype),
            None if ds is None else ds.to(s.dtype).reshape(s.shape),
            None, None, None, None, None, None, None,
        )
