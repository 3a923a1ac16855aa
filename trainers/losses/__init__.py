"""Tiled (Inf-CL style) contrastive loss: exact InfoNCE without the B x T logit matrix.

Semantics (every backend computes exactly this). Queries ``q`` (B, d), targets ``k`` (T, d)
with T >= B (extra rows are hard negatives), ``labels`` (B,) the positive column of each
query (default ``arange(B)``), logits ``X = scale * q @ k.T``, valid pairs V (see masks).

* row (query -> target):   L_r = sum_i w_i [ logsumexp_{j:(i,j) in V} X_ij - X_{i,label_i} ]
* column (target -> query), defined on the positive columns only:
                           L_c = sum_i w_i [ logsumexp_{i':(i',c) in V} X_{i',c} - X_{i,c} ],  c = label_i
  (a column shared by several queries is counted once per query; hard-negative columns have no
  column loss, they only enlarge the row denominators.)
* ``symmetric=True`` returns (L_r + L_c) / 2, else L_r. ``w`` = query_weight / sum(query_weight).

Masks, all O(B + T): ``query_weight`` (B,) >= 0 (zero drops the query from both directions and
from every column denominator), ``target_valid`` (T,) bool (False drops the column, e.g.
padding), ``query_groups`` (B,) / ``target_groups`` (T,) int64: a pair whose groups are equal
and >= 0 is excluded unless it is the query's own positive (false-negative masking: duplicates,
same document, same teacher cluster).

Teacher-guided masking (GISTEmbed; ``guide_q`` (B, g), ``guide_k`` (T, g), ``guide_margin`` m,
an absolute margin, default 0). With guide scores ``G = guide_q @ guide_k.T`` (used as given:
pass L2-normalised teacher embeddings for cosine scores), O(B + T) memory, tiled like X:

* row of query i: a pair (i, j), ``j != label_i``, is excluded from query i's row denominator
  when ``G_ij > G_{i,label_i} - m``;
* column c = label_i: a query i' whose positive is not c is excluded from column c's
  denominator when ``G_{i',c} > G_{i,c} - m``. A column is shared by the queries whose
  positive it is; its threshold is the largest of their ``G_{i,c} - m`` (the fewest
  exclusions), and those queries are never excluded from it. Hard-negative columns have no
  column loss, so only the row rule touches them.

The positive is never excluded, so a row or column whose every negative is masked has loss 0
(never NaN). Ties (``G_ij`` equal to the threshold) are kept; with m = 0 an exact duplicate of
the positive is such a tie and is decided by rounding, so use m > 0 to drop duplicates
reliably. The guide gets no gradient. Not supported by `ring_contrastive_loss`.

>>> import torch
>>> from trainers.losses import contrastive_loss
>>> from trainers.losses.reference import naive_contrastive_loss
>>> q, k = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
>>> torch.allclose(contrastive_loss(q, k, scale=10.0, impl="tiled", block_q=4, block_k=4),
...                naive_contrastive_loss(q, k, scale=10.0))
True
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
from torch import Tensor, nn

from ._common import as_scale, prepare
from .reference import naive_contrastive_loss
from .tiled import TiledLSE, cpu_acc_dtype

Impl = Literal["auto", "naive", "tiled", "triton"]

__all__ = [
    "contrastive_loss",
    "TiledContrastiveLoss",
    "naive_contrastive_loss",
    "triton_available",
    "ring_contrastive_loss",
]


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the fused Triton kernels can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    dev = torch.device(device) if device is not None else None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return dev is not None and dev.type == "cuda" and torch.cuda.is_available()


def contrastive_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor | None = None,
    scale: float | Tensor = 1 / 0.07,
    *,
    symmetric: bool = True,
    query_weight: Tensor | None = None,
    target_valid: Tensor | None = None,
    query_groups: Tensor | None = None,
    target_groups: Tensor | None = None,
    impl: Impl = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    guide_q: Tensor | None = None,
    guide_k: Tensor | None = None,
    guide_margin: float = 0.0,
) -> Tensor:
    """InfoNCE with logits ``scale * q @ k.T`` without materialising them (see module doc).

    ``guide_q`` / ``guide_k``: teacher embeddings of the queries and targets for
    teacher-guided in-batch masking with absolute margin ``guide_margin`` (module doc).

    ``impl``: "auto" = Triton on CUDA, else the pure-torch tiled path; "naive" = full logits.
    ``scale`` may be a learnable tensor (its gradient is exact); temperature = 1 / scale. The
    default, 1/0.07 (temperature 0.07), is `TiledContrastiveLoss()`'s. Gradients flow to q, k and scale. Inputs may be fp32, fp16, bf16 or fp64; accumulation is
    fp32 on GPU and fp64 in the CPU torch path (exactness there is cheap and scale 100 needs it).
    """
    if impl == "naive":
        return naive_contrastive_loss(
            q, k, labels, scale, symmetric=symmetric, query_weight=query_weight,
            target_valid=target_valid, query_groups=query_groups, target_groups=target_groups,
            guide_q=guide_q, guide_k=guide_k, guide_margin=guide_margin,
        )
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton_available(q.device) else "tiled"
    acc = cpu_acc_dtype(q) if impl == "tiled" else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    p = prepare(
        q, k, labels, symmetric=symmetric, query_weight=query_weight, target_valid=target_valid,
        query_groups=query_groups, target_groups=target_groups, acc_dtype=acc,
        guide_q=guide_q, guide_k=guide_k, guide_margin=guide_margin,
    )
    s = as_scale(scale, q)
    if impl == "tiled":
        lse = TiledLSE.apply(q, k, s, p.alpha, p.beta, p.mask, block_q or 1024, block_k or 2048)
    elif impl == "triton":
        from .triton_kernels import TritonLSE

        lse = TritonLSE.apply(q, k, s, p.alpha, p.beta, p.mask, block_q, block_k)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    # Positive logits are O(B d): plain autograd handles them (and their share of d scale).
    ps = p.pos_coef
    dots = (q.to(acc) * k[p.labels].to(acc)).sum(1)
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (lse - s.to(acc) * (ps * dots).sum()).to(out_dtype)


class TiledContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss` with a fixed or learnable logit scale.

    ``learnable=True`` stores ``log(scale)`` as a parameter (CLIP convention) clamped to
    ``max_scale`` in forward. ``guide_margin`` is the margin of teacher-guided masking, which
    is on for a call that passes ``guide_q`` and ``guide_k``.

    >>> import torch
    >>> loss_fn = TiledContrastiveLoss(temperature=0.05, learnable=True)
    >>> q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    >>> loss = loss_fn(q, q.roll(1, 0))
    >>> loss.backward(); loss_fn.log_scale.grad is not None
    True
    """

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        learnable: bool = False,
        max_scale: float = 100.0,
        symmetric: bool = True,
        impl: Impl = "auto",
        block_q: int | None = None,
        block_k: int | None = None,
        guide_margin: float = 0.0,
    ) -> None:
        super().__init__()
        self.guide_margin = guide_margin
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.max_scale = max_scale
        self.symmetric = symmetric
        self.impl: Impl = impl
        self.block_q, self.block_k = block_q, block_k

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        labels: Tensor | None = None,
        *,
        query_weight: Tensor | None = None,
        target_valid: Tensor | None = None,
        query_groups: Tensor | None = None,
        target_groups: Tensor | None = None,
        guide_q: Tensor | None = None,
        guide_k: Tensor | None = None,
    ) -> Tensor:
        return contrastive_loss(
            q, k, labels, self.scale, symmetric=self.symmetric, query_weight=query_weight,
            target_valid=target_valid, query_groups=query_groups, target_groups=target_groups,
            impl=self.impl, block_q=self.block_q, block_k=self.block_k,
            guide_q=guide_q, guide_k=guide_k, guide_margin=self.guide_margin,
        )


def ring_contrastive_loss(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Lazy alias of :func:`trainers.losses.ring.ring_contrastive_loss` (imports torch.distributed)."""
    from .ring import ring_contrastive_loss as f

    return f(*args, **kwargs)

# Global contrastive losses with per-example state (docs/methods.md).
from .em import GradientBiasEMLoss  # noqa: E402
from .sogclr import ISogCLRLoss, SogCLRLoss, cosine_gamma  # noqa: E402

__all__ += ["SogCLRLoss", "ISogCLRLoss", "cosine_gamma", "GradientBiasEMLoss"]
