"""Multi-process ring: each rank holds only its own query and target rows.

Forward: the rank's target block (with its column mask and running column LSEs) travels the
ring ``r -> r+1``. At each of the W steps a rank computes the tile "local queries x visiting
block" while the next block is already in flight (``isend``/``irecv`` posted before the
compute), folds it into its row LSEs and into the visiting block's column LSEs, then passes the
column LSEs on; after W steps they are home, complete. Backward runs the same ring: visiting
blocks carry their column LSE and weights, the local dQ accumulates, and each block's dK
accumulator travels with it and arrives home after W hops.

Semantics are those of :func:`trainers.losses.contrastive_loss` on the concatenation of all
ranks' rows (rank order), with one restriction: ``labels`` index the rank's *local* targets
(each query's positive lives on its own rank, as in data-parallel training). The returned loss
is the global loss, identical on every rank; ``.grad`` of the local rows and of ``scale`` are
exact derivatives of that global loss provided every rank back-propagates the same upstream
gradient (``loss.backward()`` does). DDP averages parameter gradients over ranks, so multiply
the loss by the world size there to recover the full-batch gradient of the encoders.

Transport is ``torch.distributed`` point-to-point (gloo on CPU, NCCL on GPU); the per-tile work
is the pure-torch tiled code, or the Triton kernels on CUDA.

>>> import torch.distributed as dist
>>> dist.is_available()
True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import PairMask, as_scale, prepare
from .tiled import cpu_acc_dtype, tiled_grad, tiled_lse, weighted_lse_sum


class _Ring:
    """Neighbour bookkeeping for one process group."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

        def glob(i: int) -> int:
            return i if group is None else dist.get_global_rank(group, i)

        self.nxt = glob((self.rank + 1) % self.world)
        self.prv = glob((self.rank - 1) % self.world)

    def shift(self, send: list[Tensor], recv: list[Tensor], tag: int) -> list[Any]:
        """Post sends to the next rank and receives from the previous one; return the handles."""
        reqs = []
        for i, t in enumerate(send):
            reqs.append(dist.isend(t.contiguous(), self.nxt, group=self.group, tag=tag * 16 + i))
        for i, t in enumerate(recv):
            reqs.append(dist.irecv(t, self.prv, group=self.group, tag=tag * 16 + i))
        return reqs


def _wait(reqs: list[Any]) -> None:
    for r in reqs:
        r.wait()


def _block_mask(mask: PairMask, meta: Tensor, own: bool) -> PairMask:
    """Mask of "local rows x visiting block"; meta = [col_ok, t_groups] of the block."""
    labels = mask.labels if own else torch.full_like(mask.labels, -1)
    tg = meta[1] if mask.q_groups is not None else None
    return PairMask(mask.row_ok, meta[0].bool(), mask.q_groups, tg, labels)


LseFn = Callable[..., tuple[Tensor, Tensor | None]]


def _backend(q: Tensor, impl: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if impl == "auto":
        from . import triton_available

        impl = "triton" if q.is_cuda and triton_available(q.device) else "tiled"
    if impl == "triton":
        from .triton_kernels import triton_grad, triton_lse

        def lse(q: Tensor, k: Tensor, s: Tensor, m: PairMask, beta: Tensor | None, bq: Any, bk: Any) -> Any:
            return triton_lse(q, k, s, m, beta, block_q=bq, block_k=bk)

        def grad(q: Tensor, k: Tensor, s: Tensor, ar: Tensor, lr: Tensor, ac: Any, lc: Any, m: PairMask,
                 bq: Any, bk: Any) -> Any:
            return triton_grad(q, k, s, ar, lr, ac, lc, m, block_q=bq, block_k=bk)

        return lse, grad
    if impl != "tiled":
        raise ValueError(f"ring supports impl 'auto', 'tiled' or 'triton', not {impl!r}")

    def lse_t(q: Tensor, k: Tensor, s: Tensor, m: PairMask, beta: Tensor | None, bq: Any, bk: Any) -> Any:
        return tiled_lse(q, k, s, m, need_cols=beta is not None, block_q=bq or 1024, block_k=bk or 2048,
                         acc=cpu_acc_dtype(q))

    def grad_t(q: Tensor, k: Tensor, s: Tensor, ar: Tensor, lr: Tensor, ac: Any, lc: Any, m: PairMask,
               bq: Any, bk: Any) -> Any:
        return tiled_grad(q, k, s, ar, lr, ac, lc, m, block_q=bq or 1024, block_k=bk or 2048)

    return lse_t, grad_t


class RingLSE(torch.autograd.Function):
    """Global ``sum alpha lse_r + sum beta lse_c`` over the ring; grads for the local rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, s: Tensor, alpha: Tensor, beta: Tensor | None,
        mask: PairMask, meta: Tensor, group: Any, impl: str, block_q: int | None, block_k: int | None,
    ) -> Tensor:
        ring = _Ring(group)
        lse_fn, _ = _backend(q, impl)
        acc = alpha.dtype
        lst = [torch.zeros(1, dtype=torch.int64) for _ in range(ring.world)]
        dist.all_gather(lst, torch.tensor([k.shape[0]], dtype=torch.int64), group=group)
        sizes = [int(x) for x in lst]
        sym = beta is not None
        lse_r = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
        cur_k, cur_meta = k, meta
        cur_beta = beta
        cur_lc = torch.full((k.shape[0],), float("-inf"), dtype=acc, device=q.device)
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            nsize = sizes[(ring.rank - step - 1) % ring.world]
            reqs: list[Any] = []
            if step < ring.world - 1:
                # The next block is in flight while this one is being computed.
                nk = torch.empty(nsize, k.shape[1], dtype=k.dtype, device=k.device)
                nmeta = torch.empty(2, nsize, dtype=meta.dtype, device=meta.device)
                send, recv = [cur_k, cur_meta], [nk, nmeta]
                if sym:
                    assert cur_beta is not None
                    nbeta = torch.empty(nsize, dtype=acc, device=q.device)
                    send.append(cur_beta)
                    recv.append(nbeta)
                reqs = ring.shift(send, recv, tag=2 * step)
            lr, lc = lse_fn(q, cur_k, s, _block_mask(mask, cur_meta, src == ring.rank), cur_beta,
                            block_q, block_k)
            lse_r = torch.logaddexp(lse_r, lr.to(acc))
            if sym and lc is not None:
                cur_lc = torch.logaddexp(cur_lc, lc.to(acc))
                if ring.world > 1:
                    nlc = torch.empty(nsize, dtype=acc, device=q.device)
                    _wait(ring.shift([cur_lc], [nlc], tag=2 * step + 1))
                    cur_lc = nlc
            _wait(reqs)
            if step < ring.world - 1:
                cur_k, cur_meta = nk, nmeta
                if sym:
                    cur_beta = nbeta
        lse_c = cur_lc if sym else None  # after W hops the column LSEs are back home
        ctx.save_for_backward(q, k, s, alpha, beta, lse_r, lse_c, meta)
        ctx.mask, ctx.cfg, ctx.sizes = mask, (group, impl, block_q, block_k), sizes
        out = weighted_lse_sum(alpha, lse_r, beta, lse_c)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, s, alpha, beta, lse_r, lse_c, meta = ctx.saved_tensors
        group, impl, block_q, block_k = ctx.cfg
        sizes = ctx.sizes
        ring = _Ring(group)
        _, grad_fn = _backend(q, impl)
        acc = alpha.dtype
        g = g.to(acc)
        sym = beta is not None
        a_r = g * alpha
        dq = torch.zeros(q.shape[0], q.shape[1], dtype=acc, device=q.device)
        cur_k, cur_meta = k, meta
        cur_w = g * beta if sym else None
        cur_lc = lse_c
        cur_dk = torch.zeros(k.shape[0], k.shape[1], dtype=acc, device=q.device)
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            nsize = sizes[(ring.rank - step - 1) % ring.world]
            reqs: list[Any] = []
            if step < ring.world - 1:
                nk = torch.empty(nsize, k.shape[1], dtype=k.dtype, device=k.device)
                nmeta = torch.empty(2, nsize, dtype=meta.dtype, device=meta.device)
                send, recv = [cur_k, cur_meta], [nk, nmeta]
                if sym:
                    assert cur_w is not None and cur_lc is not None
                    nw = torch.empty(nsize, dtype=acc, device=q.device)
                    nlc = torch.empty(nsize, dtype=acc, device=q.device)
                    send += [cur_w, cur_lc]
                    recv += [nw, nlc]
                reqs = ring.shift(send, recv, tag=2 * step)
            gq, gk = grad_fn(q, cur_k, s, a_r, lse_r, cur_w, cur_lc,
                             _block_mask(ctx.mask, cur_meta, src == ring.rank), block_q, block_k)
            dq += gq.to(acc)
            cur_dk = cur_dk + gk.to(acc)
            if ring.world > 1:
                # dK travels with its block and is home after W hops.
                ndk = torch.empty(nsize, k.shape[1], dtype=acc, device=q.device)
                _wait(ring.shift([cur_dk], [ndk], tag=2 * step + 1))
                cur_dk = ndk
            _wait(reqs)
            if step < ring.world - 1:
                cur_k, cur_meta = nk, nmeta
                if sym:
                    cur_w, cur_lc = nw, nlc
        dk = cur_dk
        ds = None
        if ctx.needs_input_grad[2]:
            ds = (q.to(acc) * dq).sum()
            dist.all_reduce(ds, group=group)
        sa = s.detach().to(acc)
        return (
            (sa * dq).to(q.dtype), (sa * dk).to(k.dtype),
            None if ds is None else ds.to(s.dtype).reshape(s.shape),
            None, None, None, None, None, None, None, None,
        )


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks in forward; identity in backward (d sum / d local term = 1)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


def ring_contrastive_loss(
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
    group: Any = None,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    guide_q: Tensor | None = None,
    guide_k: Tensor | None = None,
    guide_margin: float = 0.0,
) -> Tensor:
    """Global contrastive loss over all ranks' rows; pass only this rank's rows (see module doc).

    Call it on every rank of ``group`` with the same ``symmetric`` and with either all or no
    ranks passing ``query_groups``/``target_groups``. Teacher-guided masking (``guide_q``,
    ``guide_k``) is not supported across ranks yet: the guide blocks would have to travel the
    ring with the keys.
    """
    if guide_q is not None or guide_k is not None or guide_margin:
        raise ValueError("ring_contrastive_loss does not support guide_q/guide_k/guide_margin "
                         "(teacher-guided masking); use contrastive_loss on all-gathered rows")
    acc = cpu_acc_dtype(q)
    raw = (torch.ones(q.shape[0], dtype=acc, device=q.device) if query_weight is None
           else query_weight.to(device=q.device, dtype=acc))
    tot = raw.sum()
    dist.all_reduce(tot, group=group)
    p = prepare(
        q, k, labels, symmetric=symmetric, query_weight=query_weight, target_valid=target_valid,
        query_groups=query_groups, target_groups=target_groups, acc_dtype=acc, total_weight=tot,
    )
    s = as_scale(scale, q)
    t = k.shape[0]
    col_ok = p.mask.col_ok if p.mask.col_ok is not None else torch.ones(t, dtype=torch.bool, device=q.device)
    tg = p.mask.t_groups if p.mask.t_groups is not None else torch.full((t,), -1, device=q.device)
    meta = torch.stack([col_ok.long(), tg.long()])  # travels with the block
    lse = RingLSE.apply(q, k, s, p.alpha, p.beta, p.mask, meta, group, impl, block_q, block_k)
    dots = (q.to(acc) * k[p.labels].to(acc)).sum(1)
    pos = _AllReduceSum.apply((p.pos_coef * dots).sum(), group)
    return (lse - s.to(acc) * pos).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
