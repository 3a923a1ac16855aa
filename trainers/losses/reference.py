"""Naive full-logit contrastive loss: the float64 oracle for tests and the benchmark baseline.

Materialises the (B x T) logit matrix, so memory is O(B T). Same semantics as
:func:`trainers.losses.contrastive_loss`.

>>> import torch
>>> from trainers.losses.reference import naive_contrastive_loss
>>> q = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
>>> round(float(naive_contrastive_loss(q, q, scale=0.0)), 6) == round(float(torch.log(torch.tensor(4.0))), 6)
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import as_scale, direction_masks, guide_tiles, prepare, tile_mask


def naive_contrastive_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None = None,
    scale: float | Tensor = 1.0,
    *,
    symmetric: bool = True,
    query_weight: Tensor | None = None,
    target_valid: Tensor | None = None,
    query_groups: Tensor | None = None,
    target_groups: Tensor | None = None,
    guide_q: Tensor | None = None,
    guide_k: Tensor | None = None,
    guide_margin: float = 0.0,
) -> Tensor:
    """InfoNCE over full logits ``X = scale * q @ k.T`` (see package docs for the semantics)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = prepare(
        q, k, labels, symmetric=symmetric, query_weight=query_weight, target_valid=target_valid,
        query_groups=query_groups, target_groups=target_groups, acc_dtype=acc,
        guide_q=guide_q, guide_k=guide_k, guide_margin=guide_margin,
    )
    s = as_scale(scale, q)
    b, t = q.shape[0], k.shape[0]
    x = s.to(acc) * (q.to(acc) @ k.to(acc).T)
    m = tile_mask(b, t, p.mask.row_ok, p.mask.col_ok, p.mask.q_groups, p.mask.t_groups, p.labels)
    m_r, m_c = direction_masks(m, *guide_tiles(p.mask.guide, 0, b, 0, t), (b, t))
    x_r = x if m_r is None else x.masked_fill(~m_r, float("-inf"))
    x_c = x if m_c is None else x.masked_fill(~m_c, float("-inf"))
    # Only rows/columns with non-zero weight enter: a zero-weight row may be all -inf and its
    # logsumexp would poison the backward with nan even when multiplied by zero.
    rs = p.alpha != 0
    loss = (p.alpha[rs] * torch.logsumexp(x_r[rs], dim=1)).sum()
    if p.beta is not None:
        cs = p.beta != 0
        loss = loss + (p.beta[cs] * torch.logsumexp(x_c[:, cs], dim=0)).sum()
    ps = p.pos_coef != 0
    pos = x[ps].gather(1, p.labels[ps, None]).squeeze(1)
    return loss - (p.pos_coef[ps] * pos).sum()
