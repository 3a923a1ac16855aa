"""Pure-torch tiled LSE backend: O(B + T) extra memory, runs on any device.

Forward visits each (block_q x block_k) tile of ``X = s Q K^T`` once and folds it into the
running row LSEs (B,) and column LSEs (T,) with ``logaddexp``; only those two vectors are
saved. Backward recomputes every tile and forms

    G_ij = alpha_i exp(X_ij - lse_r_i) + beta_j exp(X_ij - lse_c_j)     (valid pairs, else 0)
    dQ = s G K,   dK = s G^T Q,   ds = sum_ij G_ij q_i.k_j = sum_i q_i . (G K)_i

so the scale gradient costs nothing beyond dQ.

>>> import torch
>>> from trainers.losses.tiled import tiled_lse
>>> q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
>>> lr, lc = tiled_lse(q, k, torch.tensor(2.0, dtype=torch.float64), block_q=2, block_k=3)
>>> torch.allclose(lr, torch.logsumexp(2 * q @ k.T, 1)) and torch.allclose(lc, torch.logsumexp(2 * q @ k.T, 0))
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import PairMask, direction_masks, guide_tiles, tile_mask

NEG_INF = float("-inf")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cpu_acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype of the torch paths: float64 on CPU (fp32 logits at scale 100 lose
    ~1e-6 relative in the gradient, float64 tiles meet the 1e-6 target), fp32 elsewhere."""
    return torch.float64 if t.dtype == torch.float64 or t.device.type == "cpu" else torch.float32


def _sl(v: Tensor | None, a: int, b: int) -> Tensor | None:
    return None if v is None else v[a:b]


def block_lse(
    qb: Tensor,
    kb: Tensor,
    s: Tensor,
    *,
    row_ok: Tensor | None = None,
    col_ok: Tensor | None = None,
    q_groups: Tensor | None = None,
    t_groups: Tensor | None = None,
    label_rel: Tensor | None = None,
    need_cols: bool = True,
    acc: torch.dtype | None = None,
    guide_out: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor | None]:
    """Row and column LSE of one tile ``s qb kb^T`` (masked pairs excluded): one matmul, both
    directions. ``guide_out``: the tile's (row-excluded, column-excluded) pairs (`guide_tiles`)."""
    acc = acc or _acc_dtype(qb)
    x = s.to(acc) * (qb.to(acc) @ kb.to(acc).T)
    m = tile_mask(x.shape[0], x.shape[1], row_ok, col_ok, q_groups, t_groups, label_rel)
    m_r, m_c = direction_masks(m, *guide_out, x.shape)
    x_r = x if m_r is None else x.masked_fill(~m_r, NEG_INF)
    if not need_cols:
        return torch.logsumexp(x_r, 1), None
    x_c = x_r if m_c is m_r else (x if m_c is None else x.masked_fill(~m_c, NEG_INF))
    return torch.logsumexp(x_r, 1), torch.logsumexp(x_c, 0)


def block_grad(
    qb: Tensor,
    kb: Tensor,
    s: Tensor,
    a_r: Tensor,
    lse_r: Tensor,
    a_c: Tensor | None,
    lse_c: Tensor | None,
    *,
    row_ok: Tensor | None = None,
    col_ok: Tensor | None = None,
    q_groups: Tensor | None = None,
    t_groups: Tensor | None = None,
    label_rel: Tensor | None = None,
    guide_out: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor]:
    """Unscaled gradients ``(G kb, G^T qb)`` of one recomputed tile (see module doc for G).

    Computed in the dtype of ``a_r`` (the caller's accumulation dtype)."""
    acc = a_r.dtype
    qa, ka = qb.to(acc), kb.to(acc)
    x = s.to(acc) * (qa @ ka.T)
    m = tile_mask(x.shape[0], x.shape[1], row_ok, col_ok, q_groups, t_groups, label_rel)
    m_r, m_c = direction_masks(m, *guide_out, x.shape)
    # +inf LSE for zero weights: their exp is exactly 0, never 0 * inf.
    inf = torch.tensor(float("inf"), dtype=acc, device=x.device)
    g = a_r[:, None] * torch.exp(x - torch.where(a_r != 0, lse_r, inf)[:, None])
    # where(), not multiply: exp(-inf - -inf) is nan on fully masked rows/columns.
    if m_r is not None:
        g = torch.where(m_r, g, 0.0)
    if a_c is not None and lse_c is not None:
        gc = a_c[None, :] * torch.exp(x - torch.where(a_c != 0, lse_c, inf)[None, :])
        g = g + (gc if m_c is None else torch.where(m_c, gc, 0.0))
    return g @ ka, g.T @ qa


def tiled_lse(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    mask: PairMask | None = None,
    *,
    need_cols: bool = True,
    block_q: int = 1024,
    block_k: int = 2048,
    acc: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Row LSEs (B,) and column LSEs (T,) of ``s Q K^T`` in one pass over tiles."""
    b, t = q.shape[0], k.shape[0]
    acc = acc or _acc_dtype(q)
    lse_r = torch.full((b,), NEG_INF, dtype=acc, device=q.device)
    lse_c = torch.full((t,), NEG_INF, dtype=acc, device=q.device) if need_cols else None
    mk = mask or PairMask(None, None, None, None, torch.zeros(b, dtype=torch.long, device=q.device))
    for r0 in range(0, b, block_q):
        r1 = min(r0 + block_q, b)
        run = torch.full((r1 - r0,), NEG_INF, dtype=acc, device=q.device)
        for c0 in range(0, t, block_k):
            c1 = min(c0 + block_k, t)
            lr, lc = block_lse(
                q[r0:r1], k[c0:c1], s, row_ok=_sl(mk.row_ok, r0, r1), col_ok=_sl(mk.col_ok, c0, c1),
                q_groups=_sl(mk.q_groups, r0, r1), t_groups=_sl(mk.t_groups, c0, c1),
                label_rel=mk.labels[r0:r1] - c0, need_cols=need_cols, acc=acc,
                guide_out=guide_tiles(mk.guide, r0, r1, c0, c1),
            )
            run = torch.logaddexp(run, lr)
            if lse_c is not None and lc is not None:
                lse_c[c0:c1] = torch.logaddexp(lse_c[c0:c1], lc)
        lse_r[r0:r1] = run
    return lse_r, lse_c


def tiled_grad(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    a_r: Tensor,
    lse_r: Tensor,
    a_c: Tensor | None,
    lse_c: Tensor | None,
    mask: PairMask | None = None,
    *,
    block_q: int = 1024,
    block_k: int = 2048,
) -> tuple[Tensor, Tensor]:
    """Unscaled ``(G K, G^T Q)`` in the accumulation dtype, recomputing tiles."""
    b, t = q.shape[0], k.shape[0]
    acc = a_r.dtype
    dq = torch.zeros(b, q.shape[1], dtype=acc, device=q.device)
    dk = torch.zeros(t, k.shape[1], dtype=acc, device=q.device)
    mk = mask or PairMask(None, None, None, None, torch.zeros(b, dtype=torch.long, device=q.device))
    for r0 in range(0, b, block_q):
        r1 = min(r0 + block_q, b)
        for c0 in range(0, t, block_k):
            c1 = min(c0 + block_k, t)
            gq, gk = block_grad(
                q[r0:r1], k[c0:c1], s, a_r[r0:r1], lse_r[r0:r1], _sl(a_c, c0, c1), _sl(lse_c, c0, c1),
                row_ok=_sl(mk.row_ok, r0, r1), col_ok=_sl(mk.col_ok, c0, c1),
                q_groups=_sl(mk.q_groups, r0, r1), t_groups=_sl(mk.t_groups, c0, c1),
                label_rel=mk.labels[r0:r1] - c0,
                guide_out=guide_tiles(mk.guide, r0, r1, c0, c1),
            )
            dq[r0:r1] += gq
            dk[c0:c1] += gk
    return dq, dk


def weighted_lse_sum(alpha: Tensor, lse_r: Tensor, beta: Tensor | None, lse_c: Tensor | None) -> Tensor:
    """``sum alpha lse_r + sum beta lse_c``, ignoring zero weights (their LSE may be -inf)."""
    out = torch.where(alpha != 0, alpha * lse_r, 0).sum()
    if beta is not None and lse_c is not None:
        out = out + torch.where(beta != 0, beta * lse_c, 0).sum()
    return out


class TiledLSE(torch.autograd.Function):
    """``F(q, k, s) = sum alpha lse_r + sum beta lse_c`` with tile recomputation in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, s: Tensor, alpha: Tensor, beta: Tensor | None,
        mask: PairMask, block_q: int, block_k: int,
    ) -> Tensor:
        lse_r, lse_c = tiled_lse(q, k, s, mask, need_cols=beta is not None, block_q=block_q,
                                 block_k=block_k, acc=alpha.dtype)
        ctx.save_for_backward(q, k, s, alpha, beta, lse_r, lse_c)
        ctx.mask, ctx.blocks = mask, (block_q, block_k)
        return weighted_lse_sum(alpha, lse_r, beta, lse_c)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, s, alpha, beta, lse_r, lse_c = ctx.saved_tensors
        g = g.to(alpha.dtype)
        dq, dk = tiled_grad(
            q, k, s, g * alpha, lse_r, None if beta is None else g * beta, lse_c, ctx.mask,
            block_q=ctx.blocks[0], block_k=ctx.blocks[1],
        )
        ds = (q.to(dq.dtype) * dq).sum() if ctx.needs_input_grad[2] else None
        sa = s.to(dq.dtype)
        return (
            (sa * dq).to(q.dtype), (sa * dk).to(k.dtype),
            None if ds is None else ds.to(s.dtype).reshape(s.shape),
            None, None, None, None, None,
        )
