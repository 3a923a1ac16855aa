"""Shared input handling for every loss backend.

All backends compute the same quantity; only how the logits are visited differs. The
contract between the public API and a backend is deliberately small: a backend evaluates

    F(q, k, s) = sum_i alpha_i * LSE_row_i + sum_j beta_j * LSE_col_j

where ``LSE_row_i = logsumexp_j {s q_i.k_j : (i, j) valid}`` and ``LSE_col_j`` the same
over ``i``, for constant weights ``alpha`` (B,) and ``beta`` (T,). The positive logits
``s q_i.k_{label_i}`` are O(B d) and are left to ordinary autograd in the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairMask:
    """Validity of the (query i, target j) pairs, in a form that stays O(B + T).

    A pair is valid when ``row_ok[i] and col_ok[j]`` and it is not a *same-group* pair:
    ``q_groups[i] == t_groups[j] >= 0`` and ``j != label[i]``. Groups express false
    negatives (duplicates, same source document, same cluster member flagged by the
    teacher): a target that shares the query's group is dropped from that query's
    denominators, except the query's own positive.
    """

    row_ok: Tensor | None  # (B,) bool; False rows are out of every LSE (zero-weight rows)
    col_ok: Tensor | None  # (T,) bool; False columns are out of every LSE (padding)
    q_groups: Tensor | None  # (B,) int64, < 0 means "no group"
    t_groups: Tensor | None  # (T,) int64
    labels: Tensor  # (B,) int64 positive column of each query
    guide: GuideMask | None = None  # teacher-guided exclusions (direction-specific)


@dataclass(frozen=True)
class GuideMask:
    """Teacher-guided in-batch exclusions (GISTEmbed), O((B + T) g) to store.

    With guide scores ``G_ij = gq_i . gk_j``, a pair (i, j) that is not the query's own positive
    (``j != labels[i]``) is dropped from query i's **row** denominator when ``G_ij > thr_r[i]``
    and from column j's **column** denominator when ``G_ij > thr_c[j]``. Unlike the other
    masks it is direction-specific, so a tile has a row mask and a column mask; the guide tile
    ``gq[rows] @ gk[cols].T`` is computed next to each logit tile, never as a B x T matrix.
    """

    gq: Tensor  # (B, g) guide embeddings of the queries
    gk: Tensor  # (T, g) guide embeddings of the targets
    thr_r: Tensor  # (B,) G_{i,label_i} - margin
    thr_c: Tensor | None  # (T,) max over the column's weighted queries of the same; +inf if none
    labels: Tensor  # (B,) the positive column of each query (never excluded)


def guide_tiles(guide: GuideMask | None, r0: int, r1: int, c0: int,
                c1: int) -> tuple[Tensor | None, Tensor | None]:
    """(row-excluded, column-excluded) boolean tiles of rows [r0, r1) x columns [c0, c1).

    Guide scores are computed in the guide's own dtype (at least fp32), not the float64 of the
    CPU logits: they only decide a mask, and an fp32 product costs half."""
    if guide is None:
        return None, None
    g = guide.gq[r0:r1] @ guide.gk[c0:c1].T
    cols = torch.arange(c0, c1, device=g.device)
    other = cols[None, :] != guide.labels[r0:r1, None]
    row_out = (g > guide.thr_r[r0:r1, None]) & other
    col_out = None
    if guide.thr_c is not None:
        col_out = (g > guide.thr_c[None, c0:c1]) & other
    return row_out, col_out


def direction_masks(base: Tensor | None, row_out: Tensor | None, col_out: Tensor | None,
                    shape: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
    """Valid pairs for the row LSEs and for the column LSEs (None: all valid). Without guide
    exclusions both are the same object, so callers can skip the second masked copy."""
    if row_out is None and col_out is None:
        m = None if base is None else base.expand(shape)
        return m, m
    def combine(out: Tensor | None) -> Tensor | None:
        if out is None:
            return base
        return ~out if base is None else base & ~out
    m_r = combine(row_out)
    m_c = combine(col_out) if col_out is not None else base
    return (None if m_r is None else m_r.expand(shape)), (None if m_c is None else m_c.expand(shape))


def tile_mask(
    n_rows: int,
    n_cols: int,
    row_ok: Tensor | None,
    col_ok: Tensor | None,
    q_groups: Tensor | None,
    t_groups: Tensor | None,
    label_rel: Tensor | None,
) -> Tensor | None:
    """Valid pairs of one (n_rows x n_cols) tile, or None when all are valid.

    Inputs are already sliced to the tile; ``label_rel`` is each row's positive column minus
    the tile's first column (values outside the tile never match, None: no positive here).
    """
    m: Tensor | None = None
    if row_ok is not None:
        m = row_ok[:, None]
    if col_ok is not None:
        m = col_ok[None, :] if m is None else m & col_ok[None, :]
    if q_groups is not None and t_groups is not None:
        same = (q_groups[:, None] == t_groups[None, :]) & (q_groups[:, None] >= 0)
        if label_rel is not None:
            cols = torch.arange(n_cols, device=t_groups.device)
            same &= cols[None, :] != label_rel[:, None]
        m = ~same if m is None else m & ~same
    return None if m is None else m.expand(n_rows, n_cols)


@dataclass(frozen=True)
class Prepared:
    """Validated inputs plus the constant LSE weights shared by all backends."""

    labels: Tensor  # (B,) int64
    weight: Tensor  # (B,) float, normalised to sum 1 (in the compute dtype)
    alpha: Tensor  # (B,) row-LSE weights (fp32 or fp64)
    beta: Tensor | None  # (T,) column-LSE weights, None for one direction
    pos_coef: Tensor  # (B,) weight of each positive logit in the loss
    mask: PairMask


def as_scale(scale: float | Tensor, like: Tensor) -> Tensor:
    """Logit scale as a 0-d tensor (keeps autograd when it is a learnable parameter)."""
    if isinstance(scale, Tensor):
        return scale.reshape(())
    return torch.tensor(float(scale), dtype=torch.float32, device=like.device)


def prepare(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None,
    *,
    symmetric: bool,
    query_weight: Tensor | None,
    target_valid: Tensor | None,
    query_groups: Tensor | None,
    target_groups: Tensor | None,
    acc_dtype: torch.dtype,
    check: bool = True,
    total_weight: Tensor | None = None,
    guide_q: Tensor | None = None,
    guide_k: Tensor | None = None,
    guide_margin: float = 0.0,
) -> Prepared:
    """Check shapes and build the constant weights alpha/beta of F (see module doc)."""
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q must be (B, d) and k (T, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t = q.shape[0], k.shape[0]
    dev = q.device
    if labels is None:
        if t < b:
            raise ValueError(f"without labels targets need at least B={b} rows, got T={t}")
        labels = torch.arange(b, device=dev)
    labels = labels.to(device=dev, dtype=torch.long).reshape(-1)
    if labels.shape[0] != b:
        raise ValueError(f"labels must have B={b} entries, got {labels.shape[0]}")
    if check and b > 0 and (int(labels.min()) < 0 or int(labels.max()) >= t):
        raise ValueError("labels out of range [0, T)")
    if query_weight is None:
        w = torch.ones(b, dtype=acc_dtype, device=dev)
        row_ok = None
    else:
        w = query_weight.to(device=dev, dtype=acc_dtype).reshape(-1)
        if w.shape[0] != b:
            raise ValueError("query_weight must have B entries")
        if check and bool((w < 0).any()):
            raise ValueError("query_weight must be >= 0")
        row_ok = w > 0
    # The ring normalises by the weight summed over all ranks.
    tot = w.sum() if total_weight is None else total_weight.to(acc_dtype)
    if check and float(tot) <= 0:
        raise ValueError("query_weight sums to zero")
    w = w / tot
    col_ok = None
    if target_valid is not None:
        col_ok = target_valid.to(device=dev, dtype=torch.bool).reshape(-1)
        if col_ok.shape[0] != t:
            raise ValueError("target_valid must have T entries")
        if check and not bool(col_ok[labels][w > 0].all()):
            raise ValueError("a weighted query's positive column is marked invalid")
    qg = tg = None
    if (query_groups is None) != (target_groups is None):
        raise ValueError("give both query_groups and target_groups, or neither")
    if query_groups is not None and target_groups is not None:
        qg = query_groups.to(device=dev, dtype=torch.long).reshape(-1)
        tg = target_groups.to(device=dev, dtype=torch.long).reshape(-1)
        if qg.shape[0] != b or tg.shape[0] != t:
            raise ValueError("query_groups must have B entries and target_groups T")
    a_row = 0.5 if symmetric else 1.0
    alpha = a_row * w
    beta = None
    if symmetric:
        # Column j's LSE counts once per query whose positive is j.
        beta = torch.zeros(t, dtype=acc_dtype, device=dev).index_add_(0, labels, 0.5 * w)
    pos_coef = w.clone()
    guide = prepare_guide(guide_q, guide_k, guide_margin, labels, row_ok, t, symmetric
                          ) if (guide_q is not None or guide_k is not None) else None
    return Prepared(labels, w, alpha, beta, pos_coef,
                    PairMask(row_ok, col_ok, qg, tg, labels, guide))


def prepare_guide(guide_q: Tensor | None, guide_k: Tensor | None, margin: float, labels: Tensor,
                  row_ok: Tensor | None, t: int, symmetric: bool) -> GuideMask:
    """Check the guide embeddings and compute the O(B + T) thresholds (see `GuideMask`)."""
    if guide_q is None or guide_k is None:
        raise ValueError("give both guide_q and guide_k, or neither")
    b = labels.shape[0]
    if guide_q.ndim != 2 or guide_k.ndim != 2 or guide_q.shape[1] != guide_k.shape[1]:
        raise ValueError(f"guide_q must be (B, g) and guide_k (T, g); got "
                         f"{tuple(guide_q.shape)} and {tuple(guide_k.shape)}")
    if guide_q.shape[0] != b or guide_k.shape[0] != t:
        raise ValueError(f"guide_q must have B={b} rows and guide_k T={t}; got "
                         f"{guide_q.shape[0]} and {guide_k.shape[0]}")
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"guide_margin must be finite, got {margin}")
    dev = labels.device
    dtype = torch.promote_types(torch.promote_types(guide_q.dtype, guide_k.dtype), torch.float32)
    gq = guide_q.detach().to(device=dev, dtype=dtype)
    gk = guide_k.detach().to(device=dev, dtype=dtype)
    pos = (gq * gk[labels]).sum(1)
    thr_r = pos - margin
    thr_c = None
    if symmetric:
        # Zero-weight queries have no column term and are out of every column denominator.
        src = thr_r if row_ok is None else thr_r.masked_fill(~row_ok, float("-inf"))
        thr_c = torch.full((t,), float("inf"), dtype=dtype, device=dev).scatter_reduce(
            0, labels, src, reduce="amax", include_self=False)
    return GuideMask(gq, gk, thr_r, thr_c, labels)
