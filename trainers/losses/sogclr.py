"""SogCLR and iSogCLR: global contrastive losses that work with small batches.

See ``/work/shared/ALGORITHMS.md`` section 4 and ``docs/methods.md``. Per anchor ``i`` the
global objective is ``F_i = tau * log E_{z in S_i} exp((s_iz - s_ii) / tau)`` over *all* the
dataset's negatives ``S_i``; a mini-batch only sees a few of them, and ``log`` of a mini-batch
mean is a biased estimate. SogCLR keeps a per-example moving average ``u_i`` of the
normaliser ``g_i = mean_j exp(a_ij)`` (a_ij the anchor's scaled logits over the batch's
candidates) and uses it in place of the batch's own normaliser:

    u_i <- (1 - gamma) u_i + gamma g_i          (batch anchors only; first visit u_i = g_i)
    p_ij = exp(a_ij) / u_i                      (no gradient)
    unimodal ("s-form", a = s/tau):   loss_i = -s_ii + mean_j p_ij s_ij
    bimodal  ("d-form", a = d/tau, d_ij = s_ij - s_ii, each side its own u):
                                      loss_i = mean_j p_ij d_ij

With ``gamma = 1`` (u_i = g_i) the gradient of ``mean_i loss_i`` is exactly ``tau`` times the
gradient of the plain mini-batch InfoNCE whose denominator holds the candidates: by default
the negatives only (the positive excluded, as in the paper and official code: a "decoupled"
InfoNCE), or with ``include_positive=True`` the usual InfoNCE of
:func:`trainers.losses.contrastive_loss` (``symmetric=False`` unimodal, ``symmetric=True``
bimodal, ``scale=1/tau``).

**Returned value.** ``p`` is detached, so ``mean_i loss_i`` has the right gradient but no
meaningful value. The module returns ``surrogate - surrogate.detach() + F_hat`` where
``F_hat = mean_i tau_i log(u_i) - s_ii`` (s-form; ``tau_i log u_i`` d-form) is the current
estimate of the *global* objective: same gradient, a value worth logging.

**Tiling.** Nothing materialises the B x T logits: ``g_i`` is a row log-sum-exp from the
tiled pass, and the gradient of ``mean_j p_ij s_ij`` is ``(g_i/u_i) * tau * grad LSE_i``, so
the surrogate is a weighted LSE evaluated by :class:`trainers.losses.tiled.TiledLSE` (tiles
recomputed in backward). That costs one extra tiled pass over the direct formula (LSE for
``g`` without grad, then the weighted LSE with its backward; iSogCLR adds one more pass for the
temperature gradient) and is what lets the same code run with many extra negatives. With
SogCLR's small batches either way is cheap.

**Stability.** ``u`` is stored shifted, ``u_eff = u * exp(b)``, with ``b_i`` a running max of
``log g_i`` (the official code keeps a running max of the logits; any running upper bound works
and ``log g_i`` is what the tiled pass gives). Stored values stay in ``(0, 1]``, whatever tau.

>>> import torch, torch.nn.functional as F
>>> loss_fn = SogCLRLoss(100, tau=0.1, gamma=0.9)
>>> q = F.normalize(torch.randn(8, 16), dim=1); k = F.normalize(q + 0.1 * torch.randn(8, 16), dim=1)
>>> loss = loss_fn(q, k, torch.arange(8))          # dataset rows 0..7
>>> bool(loss_fn.seen_q[:8].all()), sorted(loss_fn.state_dict())[:3]
(True, ['b_q', 'seen_q', 'u_q'])
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._common import PairMask, tile_mask
from .tiled import TiledLSE, cpu_acc_dtype, tiled_lse

__all__ = ["SogCLRLoss", "ISogCLRLoss", "cosine_gamma"]


def cosine_gamma(epoch: float, *, n_epochs: float, gamma_min: float = 0.2,
                 gamma_max: float = 1.0) -> float:
    """FastCLIP-style cosine decay of gamma from ``gamma_max`` (epoch 0) to ``gamma_min``
    (epoch ``n_epochs`` and after). Starting at 1 means "trust the fresh batch" while the
    encoder, hence u, is changing fast.

    >>> [round(cosine_gamma(e, n_epochs=4, gamma_min=0.2), 3) for e in (0, 2, 4, 9)]
    [1.0, 0.6, 0.2, 0.2]
    """
    if n_epochs <= 0 or epoch >= n_epochs:
        return gamma_min
    return gamma_min + (gamma_max - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / n_epochs))


def _exclusion_mask(b: int, t: int, labels: Tensor, col_ok: Tensor | None,
                    include_positive: bool) -> PairMask:
    """Candidate pairs of a row problem: the positive is dropped via the group mechanism of
    :class:`PairMask` (query group = its label column, target group = its own column, and a
    ``labels`` entry that matches no column, so the "own positive is kept" exception never
    fires)."""
    dev = labels.device
    if include_positive:
        return PairMask(None, col_ok, None, None, labels)
    return PairMask(None, col_ok, labels, torch.arange(t, device=dev),
                    torch.full((b,), -1, dtype=torch.long, device=dev))


def _softmax_mean(x_q: Tensor, k: Tensor, lse: Tensor, mask: PairMask, block_q: int,
                  block_k: int) -> Tensor:
    """Row means ``sum_j softmax_ij x_ij`` of ``x = x_q k^T`` over valid pairs, by tiles."""
    acc = lse.dtype
    out = torch.zeros_like(lse)
    b, t = x_q.shape[0], k.shape[0]
    for r0 in range(0, b, block_q):
        r1 = min(r0 + block_q, b)
        for c0 in range(0, t, block_k):
            c1 = min(c0 + block_k, t)
            x = x_q[r0:r1].to(acc) @ k[c0:c1].to(acc).T
            w = torch.exp(x - lse[r0:r1, None])
            m = tile_mask(r1 - r0, c1 - c0, None if mask.row_ok is None else mask.row_ok[r0:r1],
                          None if mask.col_ok is None else mask.col_ok[c0:c1],
                          None if mask.q_groups is None else mask.q_groups[r0:r1],
                          None if mask.t_groups is None else mask.t_groups[c0:c1],
                          mask.labels[r0:r1] - c0)
            if m is not None:
                w = torch.where(m, w, 0.0)
            out[r0:r1] += (w * x).sum(1)
    return out


class SogCLRLoss(nn.Module):
    """SogCLR global contrastive loss with a per-example normaliser buffer (see module doc).

    ``forward(q, k, indices, labels=None, target_valid=None)``: ``q`` (B, d) and ``k`` (T, d)
    L2-normalised, T >= B (rows past the positives are extra hard negatives), ``indices`` (B,)
    the *dataset rows* of the queries (the u buffers are indexed by them; rows must be
    distinct within a batch), ``labels`` (B,) each query's positive column (default
    ``arange(B)``), ``target_valid`` (T,) bool to drop padding columns.

    * ``bimodal=False``: anchors are the queries, candidates the target columns (s-form).
    * ``bimodal=True``: also the positive targets as anchors against the B queries, each side
      with its own u over ``d_ij = s_ij - s_ii`` (d-form); the loss is the mean of both sides.
      Extra hard-negative columns only enlarge the query side's candidates (as in
      :func:`trainers.losses.contrastive_loss`).

    ``gamma`` may be changed between steps (``loss.gamma = cosine_gamma(epoch, ...)``) or set
    from ``gamma_schedule(epoch)`` by :meth:`set_epoch`. Buffers ``u_*``, ``b_*``, ``seen_*``
    (and iSogCLR's temperatures) are in ``state_dict()``: checkpoint them with the model.
    Under DDP each rank updates only its own rows: all-gather q, k and indices first (or
    synchronise the buffers) if the ranks must agree.
    """

    sides: tuple[str, ...]

    def __init__(
        self,
        n_examples: int,
        *,
        tau: float = 0.1,
        gamma: float = 0.9,
        bimodal: bool = False,
        include_positive: bool = False,
        gamma_schedule: Callable[[int], float] | None = None,
        block_q: int = 1024,
        block_k: int = 2048,
    ) -> None:
        super().__init__()
        if n_examples < 1:
            raise ValueError("n_examples must be >= 1")
        if not 0.0 < gamma <= 1.0:
            raise ValueError("gamma must be in (0, 1]")
        self.n_examples = n_examples
        self.tau = tau
        self.gamma = gamma
        self.bimodal = bimodal
        self.include_positive = include_positive
        self.gamma_schedule = gamma_schedule
        self.block_q, self.block_k = block_q, block_k
        self.sides = ("q", "t") if bimodal else ("q",)
        for side in self.sides:
            self.register_buffer(f"u_{side}", torch.ones(n_examples))
            self.register_buffer(f"b_{side}", torch.zeros(n_examples))
            self.register_buffer(f"seen_{side}", torch.zeros(n_examples, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"n_examples={self.n_examples}, tau={self.tau}, gamma={self.gamma}, "
                f"bimodal={self.bimodal}, include_positive={self.include_positive}")

    # ----------------------------------------------------------------- buffers

    def set_epoch(self, epoch: int) -> None:
        """Set gamma from ``gamma_schedule`` (no-op without one)."""
        if self.gamma_schedule is not None:
            self.gamma = float(self.gamma_schedule(epoch))

    def normaliser(self, indices: Tensor | None = None, side: str = "q") -> Tensor:
        """Effective ``u_i = u * exp(b)`` (in units of the side's ``exp(a_ij)``; NaN if unseen)."""
        u, b, seen = self._buf(side)
        idx = slice(None) if indices is None else indices
        out = u[idx] * torch.exp(b[idx])
        return torch.where(seen[idx], out, torch.full_like(out, float("nan")))

    def _buf(self, side: str) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"u_{side}"), getattr(self, f"b_{side}"), getattr(self, f"seen_{side}")

    @torch.no_grad()
    def _update_u(self, side: str, idx: Tensor, log_g: Tensor) -> Tensor:
        """Moving-average update of the batch rows; returns the new effective ``log u``."""
        u, b, seen = self._buf(side)
        log_g = log_g.to(u.dtype)
        was = seen[idx]
        b_old, u_old = b[idx], u[idx]
        b_new = torch.where(was, torch.maximum(b_old, log_g), log_g)
        fresh = torch.exp(log_g - b_new)
        u_new = torch.where(was, (1.0 - self.gamma) * u_old * torch.exp(b_old - b_new)
                            + self.gamma * fresh, fresh)
        u[idx], b[idx], seen[idx] = u_new, b_new, True
        return torch.log(u_new) + b_new

    # ----------------------------------------------------------------- hooks (iSogCLR)

    def _tau_rows(self, side: str, idx: Tensor, like: Tensor) -> Tensor:
        return torch.full((idx.shape[0],), float(self.tau), dtype=like.dtype, device=like.device)

    def _after(self, side: str, idx: Tensor, tau: Tensor, log_u: Tensor, c: Tensor,
               mean_pa: Callable[[], Tensor]) -> None:
        """Called with no grad after each side's update (iSogCLR updates temperatures here)."""

    # ----------------------------------------------------------------- forward

    def _side(self, side: str, anchors: Tensor, cands: Tensor, pos: Tensor, mask: PairMask,
              n_cand: Tensor, idx: Tensor, d_form: bool) -> tuple[Tensor, Tensor]:
        """One direction: (surrogate with SogCLR's gradient, per-anchor objective estimate)."""
        bsz = anchors.shape[0]
        acc = cpu_acc_dtype(anchors)
        one = torch.ones((), dtype=acc, device=anchors.device)
        tau = self._tau_rows(side, idx, anchors).detach()
        tau_acc = tau.to(acc)
        with torch.no_grad():
            xa = anchors.detach() / tau[:, None]
            lse, _ = tiled_lse(xa, cands.detach(), one, mask, need_cols=False,
                               block_q=self.block_q, block_k=self.block_k, acc=acc)
            pos_a = pos.detach().to(acc) / tau_acc
            log_g = lse - torch.log(n_cand.to(acc))
            if d_form:
                log_g = log_g - pos_a   # d_ij / tau = s_ij / tau - s_ii / tau
            log_u = self._update_u(side, idx, log_g).to(acc)
            c = torch.exp(log_g - log_u)    # mean_j p_ij = g_i / u_i (1 when gamma = 1)

            def mean_pa() -> Tensor:
                # mean_j p_ij a_ij = c_i * E_softmax[a_i.], a = s/tau (s-form) or d/tau (d-form)
                e = _softmax_mean(xa, cands.detach(), lse, mask, self.block_q, self.block_k)
                return c * (e - pos_a if d_form else e)

            self._after(side, idx, tau, log_u, c, mean_pa)
        # grad of mean_j p_ij s_ij = c_i * tau_i * grad LSE_j(s_ij / tau_i): a weighted tiled LSE.
        lse_term = TiledLSE.apply(anchors / tau[:, None], cands, one, c * tau_acc / bsz, None, mask,
                                  self.block_q, self.block_k)
        pos_coef = c if d_form else torch.ones_like(c)
        surrogate = lse_term - (pos_coef * pos.to(acc)).sum() / bsz
        objective = tau_acc * log_u - (0.0 if d_form else pos.detach().to(acc))
        return surrogate, objective

    def forward(self, q: Tensor, k: Tensor, indices: Tensor, labels: Tensor | None = None,
                target_valid: Tensor | None = None) -> Tensor:
        if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
            raise ValueError(f"q must be (B, d) and k (T, d); "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}")
        bsz, t = q.shape[0], k.shape[0]
        dev = q.device
        idx = torch.as_tensor(indices, device=self.u_q.device).long().reshape(-1)
        if idx.shape[0] != bsz:
            raise ValueError(f"indices must have B={bsz} entries")
        if bsz and (int(idx.min()) < 0 or int(idx.max()) >= self.n_examples):
            raise ValueError(f"indices out of range [0, {self.n_examples})")
        lab = torch.arange(bsz, device=dev) if labels is None else labels.to(dev).long().reshape(-1)
        if lab.shape[0] != bsz or (bsz and (int(lab.min()) < 0 or int(lab.max()) >= t)):
            raise ValueError("labels must be B column indices in [0, T)")
        col_ok = None if target_valid is None else target_valid.to(dev).bool().reshape(-1)
        n_valid = torch.tensor(float(t if col_ok is None else int(col_ok.sum())), device=dev)
        drop = 0.0 if self.include_positive else 1.0
        if float(n_valid) - drop < 1 or (self.bimodal and bsz - drop < 1):
            raise ValueError("no negatives: the batch is too small")
        pos = (q * k[lab]).sum(1)
        mask_q = _exclusion_mask(bsz, t, lab, col_ok, self.include_positive)
        surr, obj = self._side("q", q, k, pos, mask_q, n_valid - drop, idx, d_form=self.bimodal)
        if self.bimodal:
            # Target side: anchors are the positive targets, candidates the B queries.
            own = torch.arange(bsz, device=dev)
            mask_t = _exclusion_mask(bsz, bsz, own, None, self.include_positive)
            n_t = torch.tensor(float(bsz), device=dev) - drop
            s2, o2 = self._side("t", k[lab], q, pos, mask_t, n_t, idx, d_form=True)
            surr, obj = (surr + s2) / 2, torch.cat([obj, o2])
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (surr - surr.detach() + obj.mean()).to(out_dtype)


class ISogCLRLoss(SogCLRLoss):
    """iSogCLR: SogCLR with a learnable temperature per example (and per side when bimodal).

    After each step, for the batch anchors (no gradient into the model):

        grad_i = log u_i + rho - mean_j p_ij a_ij        (a_ij = s_ij / tau_i, d-form: d_ij / tau_i)
        m_i   <- (1 - beta) m_i + beta grad_i
        tau_i <- clip(tau_i - eta m_i, tau_min, tau_max)

    ``grad_i`` is the derivative in ``tau_i`` of ``tau_i log g_i + rho tau_i`` with ``u_i`` in
    place of ``g_i``; the step uses the temperatures from before the update. Buffers
    ``tau_q``/``m_q`` (``tau_t``/``m_t`` bimodal) are in ``state_dict()``.

    >>> import torch, torch.nn.functional as F
    >>> loss_fn = ISogCLRLoss(10, tau=0.1)
    >>> q = F.normalize(torch.randn(4, 8), dim=1)
    >>> _ = loss_fn(q, q.roll(1, 0), torch.tensor([0, 3, 5, 7]))
    >>> taus = loss_fn.tau_q
    >>> bool((taus[[0, 3, 5, 7]] != taus[1]).all()), round(float(taus[1]), 6)
    (True, 0.1)
    """

    def __init__(
        self,
        n_examples: int,
        *,
        tau: float = 0.1,
        gamma: float = 0.9,
        bimodal: bool = False,
        include_positive: bool = False,
        gamma_schedule: Callable[[int], float] | None = None,
        rho: float = 0.3,
        eta: float = 0.01,
        beta: float = 0.9,
        tau_min: float = 0.05,
        tau_max: float = 0.7,
        block_q: int = 1024,
        block_k: int = 2048,
    ) -> None:
        super().__init__(n_examples, tau=tau, gamma=gamma, bimodal=bimodal,
                         include_positive=include_positive, gamma_schedule=gamma_schedule,
                         block_q=block_q, block_k=block_k)
        if not tau_min <= tau <= tau_max:
            raise ValueError("need tau_min <= tau <= tau_max")
        self.rho, self.eta, self.beta = rho, eta, beta
        self.tau_min, self.tau_max = tau_min, tau_max
        for side in self.sides:
            self.register_buffer(f"tau_{side}", torch.full((n_examples,), float(tau)))
            self.register_buffer(f"m_{side}", torch.zeros(n_examples))

    def _tau_rows(self, side: str, idx: Tensor, like: Tensor) -> Tensor:
        return getattr(self, f"tau_{side}")[idx].to(dtype=like.dtype, device=like.device)

    def _after(self, side: str, idx: Tensor, tau: Tensor, log_u: Tensor, c: Tensor,
               mean_pa: Callable[[], Tensor]) -> None:
        taus, m = getattr(self, f"tau_{side}"), getattr(self, f"m_{side}")
        grad = (log_u + self.rho - mean_pa()).to(m.dtype)
        m_new = (1.0 - self.beta) * m[idx] + self.beta * grad
        m[idx] = m_new
        taus[idx] = (tau.to(taus.dtype) - self.eta * m_new).clamp(self.tau_min, self.tau_max)
