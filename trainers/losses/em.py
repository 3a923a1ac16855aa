"""Gradient-bias EM loss: a decomposable contrastive objective optimised by stochastic EM.

**This is our interpretation** of Chen et al., "Why do we need large batch sizes in
contrastive learning? A gradient-bias perspective" (NeurIPS 2022). Only the abstract was
available (``/work/shared/ALGORITHMS.md`` section 5): the mini-batch estimate of
``log Z_i`` (Z_i = the mean over the dataset's negatives of ``exp(s_ij / tau)``) is biased
because ``log`` of a sum does not decompose; a data-augmentation variable makes the loss
decomposable and is fitted by EM. We use the variational bound

    log Z = min_{nu > 0} [ nu Z - log nu - 1 ]      (minimum at nu = 1/Z)

which gives, per anchor ``i`` with its own ``nu_i`` (a buffer of length N, indexed by row),

    L(theta, nu) = (1/n) sum_i [ -s_ii/tau + nu_i Z_i(theta) - log nu_i - 1 ].

``L`` is *linear* in the negatives, so with ``nu`` fixed the mini-batch estimate
``(1/B) sum_{i in S} [-s_ii/tau + nu_i mean_{j in S, j != i} exp(s_ij/tau) - log nu_i - 1]`` of
a uniformly drawn batch ``S`` is unbiased for ``L``, and so is its gradient in ``theta``
(tested exactly over all batches of a tiny set). At ``nu_i = 1/Z_i``, ``L`` equals the global
(decoupled) InfoNCE ``(1/n) sum_i [log Z_i - s_ii/tau]`` and its gradient.

* **M-step** (``forward``): SGD on ``theta`` with ``nu`` fixed (the gradient of the
  ``nu_i Z_i`` term is ``nu_i g_i * grad LSE_i``: a weighted tiled log-sum-exp, no B x T
  logits kept).
* **E-step** (``e_step``, and by default after every ``forward``): ``Z_i <- momentum Z_i +
  (1 - momentum) g_i`` for the batch rows (first visit: ``Z_i = g_i``), ``nu_i = 1 / Z_i``;
  ``g_i`` is the batch estimate (no grad). A row's first visit sets ``Z_i`` *before* its
  M-step (``nu`` must exist); later E-steps run *after* the M-step, so the ``nu`` a step uses
  comes from earlier visits and is independent of the current batch. That ordering is the
  difference with SogCLR, whose ``u_i`` already includes the current batch
  (:class:`trainers.losses.sogclr.SogCLRLoss`; its ``gamma`` plays the part of
  ``1 - momentum``). A full E-step (``nu`` refreshed from a no-grad pass over the data) is
  ``e_step`` over every batch of that pass. Posterior sampling of ``nu`` is not implemented.

Extra hard-negative columns (T > B) join the candidates of every query; with mined negatives
the estimate is unbiased for a *hard-negative-weighted* objective, not for the uniform one.
The returned value is the exact mini-batch value of ``L`` (in InfoNCE units, 1/tau scale).

>>> import torch, torch.nn.functional as F
>>> em = GradientBiasEMLoss(50, tau=0.1, momentum=0.9)
>>> q = F.normalize(torch.randn(6, 8), dim=1); k = F.normalize(q + 0.2 * torch.randn(6, 8), dim=1)
>>> loss = em(q, k, torch.arange(6))
>>> bool(em.seen[:6].all()), em.nu.shape
(True, torch.Size([50]))
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sogclr import _exclusion_mask
from .tiled import TiledLSE, cpu_acc_dtype, tiled_lse

__all__ = ["GradientBiasEMLoss"]


class GradientBiasEMLoss(nn.Module):
    """Augmented decomposable contrastive loss with per-example ``nu`` (see module doc).

    ``forward(q, k, indices, labels=None, target_valid=None, *, e_step=None)``: ``q`` (B, d),
    ``k`` (T, d) L2-normalised, ``indices`` (B,) dataset rows (distinct), ``labels`` the
    positive columns (default ``arange(B)``). ``e_step=None`` follows ``auto_e_step``.
    Buffers: ``log_z`` (N,) the running ``log Z_i`` (``nu = exp(-log_z)``) and ``seen`` (N,).
    """

    def __init__(
        self,
        n_examples: int,
        *,
        tau: float = 0.1,
        momentum: float = 0.9,
        include_positive: bool = False,
        auto_e_step: bool = True,
        block_q: int = 1024,
        block_k: int = 2048,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        self.n_examples = n_examples
        self.tau = tau
        self.momentum = momentum
        self.include_positive = include_positive
        self.auto_e_step = auto_e_step
        self.block_q, self.block_k = block_q, block_k
        # log Z rather than Z: exp(s/tau) spans e^{+-1/tau}; logs keep every tau representable.
        self.register_buffer("log_z", torch.zeros(n_examples))
        self.register_buffer("seen", torch.zeros(n_examples, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"n_examples={self.n_examples}, tau={self.tau}, momentum={self.momentum}"

    @property
    def nu(self) -> Tensor:
        """Current ``nu = 1 / Z`` for every row (1 for rows never seen)."""
        return torch.exp(-self.log_z)

    def _prepare(self, q: Tensor, k: Tensor, indices: Tensor, labels: Tensor | None,
                 target_valid: Tensor | None):  # type: ignore[no-untyped-def]
        if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
            raise ValueError(f"q must be (B, d) and k (T, d); "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}")
        bsz, t = q.shape[0], k.shape[0]
        idx = torch.as_tensor(indices, device=self.log_z.device).long().reshape(-1)
        bad = bsz and (int(idx.min()) < 0 or int(idx.max()) >= self.n_examples)
        if idx.shape[0] != bsz or bad:
            raise ValueError(f"indices must be B={bsz} rows in [0, {self.n_examples})")
        lab = (torch.arange(bsz, device=q.device) if labels is None
               else labels.to(q.device).long().reshape(-1))
        if lab.shape[0] != bsz or (bsz and (int(lab.min()) < 0 or int(lab.max()) >= t)):
            raise ValueError("labels must be B column indices in [0, T)")
        col_ok = None if target_valid is None else target_valid.to(q.device).bool().reshape(-1)
        n = (t if col_ok is None else int(col_ok.sum())) - (0 if self.include_positive else 1)
        if n < 1:
            raise ValueError("no negatives: the batch is too small")
        return idx, lab, _exclusion_mask(bsz, t, lab, col_ok, self.include_positive), n

    def _log_g(self, q: Tensor, k: Tensor, mask, n: int) -> Tensor:  # type: ignore[no-untyped-def]
        """``log mean_j exp(s_ij / tau)`` over each query's candidates (tiled, no grad)."""
        acc = cpu_acc_dtype(q)
        one = torch.ones((), dtype=acc, device=q.device)
        with torch.no_grad():
            lse, _ = tiled_lse(q.detach() / self.tau, k.detach(), one, mask, need_cols=False,
                               block_q=self.block_q, block_k=self.block_k, acc=acc)
        return lse - math.log(n)

    @torch.no_grad()
    def _update(self, idx: Tensor, log_g: Tensor, only_unseen: bool = False) -> None:
        log_g = log_g.to(self.log_z.dtype)
        was = self.seen[idx]
        m = self.momentum
        ema = (torch.logaddexp(math.log(m) + self.log_z[idx], math.log1p(-m) + log_g)
               if m > 0 else log_g)
        new = torch.where(was, ema, log_g)
        if only_unseen:
            new = torch.where(was, self.log_z[idx], log_g)
        self.log_z[idx] = new
        self.seen[idx] = True

    @torch.no_grad()
    def e_step(self, q: Tensor, k: Tensor, indices: Tensor, labels: Tensor | None = None,
               target_valid: Tensor | None = None) -> None:
        """E-step for the batch rows: update the running ``Z_i`` (hence ``nu_i = 1/Z_i``)."""
        idx, _, mask, n = self._prepare(q, k, indices, labels, target_valid)
        self._update(idx, self._log_g(q, k, mask, n))

    def forward(self, q: Tensor, k: Tensor, indices: Tensor, labels: Tensor | None = None,
                target_valid: Tensor | None = None, *, e_step: bool | None = None) -> Tensor:
        """M-step loss with ``nu`` fixed (then, by default, the E-step on this batch)."""
        idx, lab, mask, n = self._prepare(q, k, indices, labels, target_valid)
        bsz = q.shape[0]
        acc = cpu_acc_dtype(q)
        log_g = self._log_g(q, k, mask, n)
        self._update(idx, log_g, only_unseen=True)           # nu must exist before the M-step
        log_nu = -self.log_z[idx].to(acc)
        nu_g = torch.exp(log_nu + log_g)                     # nu_i * g_i, the batch's nu_i Z_i
        one = torch.ones((), dtype=acc, device=q.device)
        # grad of nu_i g_i = nu_i g_i * grad LSE_i(s / tau): weights nu_i g_i / B on the row LSEs.
        lse_term = TiledLSE.apply(q / self.tau, k, one, nu_g / bsz, None, mask,
                                  self.block_q, self.block_k)
        pos = (q * k[lab]).sum(1).to(acc) / self.tau
        value = (-pos.detach() + nu_g - log_nu - 1.0).mean()
        loss = -pos.mean() + (lse_term - lse_term.detach()) + value.detach() + pos.detach().mean()
        if self.auto_e_step if e_step is None else e_step:
            self._update(idx, log_g)
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return loss.to(out_dtype)
