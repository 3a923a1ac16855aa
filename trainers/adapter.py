"""Three-phase adapter training as library steps (Tian 2025; ALGORITHMS.md section 6).

A model is ``adapter(backbone(x))`` with a small adapter (e.g. a linear or 2-layer head):

1. **co-train** backbone + adapter on small batches (:func:`cotrain_step`);
2. **adapt**: freeze the backbone, compute its features once (:func:`cache_features`), then
   train the adapter alone on very large batches of cached features (:func:`adapter_step`;
   the loss is the tiled contrastive loss, so B x B logits are never stored);
3. **transfer**: for a large batch, compute the full-batch loss gradient at the backbone
   outputs (through the adapter), then backpropagate it into the backbone segment by segment
   (:func:`transfer_step`, which is GradCache with ``adapter`` folded into the loss).

Every step function only needs the models, the inputs of one batch, and an optional
optimiser; the loop, the data order and checkpoints are the caller's. :class:`PhaseState`
plus :func:`save_checkpoint` / :func:`load_checkpoint` make a loop resumable mid-phase
(phase, step, model and optimiser states, RNG state, optional tensors such as the cache).
The source is the thesis abstract only: the split into phases, the caching and the segmented
transfer are as described there; step sizes, schedules and whether phase 3 also updates the
adapter (``train_adapter``) are our choices.

>>> import torch
>>> from trainers.losses import contrastive_loss
>>> backbone, adapter = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
>>> loss = lambda q, t: contrastive_loss(q, t, scale=5.0)
>>> x, y = torch.randn(16, 6), torch.randn(16, 6)
>>> opt = torch.optim.SGD([*backbone.parameters(), *adapter.parameters()], lr=0.1)
>>> v1 = cotrain_step(AdapterModel(backbone, adapter), x[:4], y[:4], loss, optimizer=opt)
>>> fq, ft = cache_features(backbone, x.split(8)), cache_features(backbone, y.split(8))
>>> v2 = adapter_step(adapter, fq, ft, torch.arange(16), loss,
...                   optimizer=torch.optim.SGD(adapter.parameters(), lr=0.1))
>>> v3 = transfer_step(backbone, adapter, x, y, loss, chunk_size=4,
...                    optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1))
>>> state = PhaseState(schedule=(1, 1, 1)); state.advance(); (state.phase, state.step)
(2, 0)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .gradcache import Encode, GradCache, default_encode

LossFn = Callable[..., Tensor]

__all__ = [
    "AdapterModel",
    "PhaseState",
    "adapter_step",
    "cache_features",
    "cotrain_step",
    "load_checkpoint",
    "save_checkpoint",
    "transfer_step",
]

PHASES = {1: "cotrain", 2: "adapt", 3: "transfer"}


class AdapterModel(nn.Module):
    """``adapter(encode(backbone, inputs))``: the full model of phase 1 and of inference."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module, *,
                 encode: Encode | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self._encode = encode or default_encode

    def forward(self, inputs: Any) -> Tensor:
        return self.adapter(self._encode(self.backbone, inputs))


@contextlib.contextmanager
def _frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Turn ``requires_grad`` off for the modules' parameters inside the block (restored after)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _optimise(optimizer: torch.optim.Optimizer | None, run: Callable[[], float]) -> float:
    """zero_grad, run (fills .grad), step; without an optimiser just run (caller steps)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    value = run()
    if optimizer is not None:
        optimizer.step()
    return value


# --------------------------------------------------------------------------- phase 1


def cotrain_step(
    model: nn.Module,
    query_inputs: Any,
    target_inputs: Any,
    loss: LossFn,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    target_model: nn.Module | None = None,
    **loss_kwargs: Any,
) -> float:
    """Phase 1: one ordinary step of backbone + adapter (``model``, e.g. :class:`AdapterModel`)
    on a small batch. ``target_model`` for a second tower (default: shared)."""
    t_model = target_model or model

    def run() -> float:
        value = loss(model(query_inputs), t_model(target_inputs), **loss_kwargs)
        value.backward()
        return float(value.detach())

    return _optimise(optimizer, run)


# --------------------------------------------------------------------------- phase 2


def cache_features(
    backbone: nn.Module,
    batches: Iterable[Any],
    *,
    encode: Encode | None = None,
    select: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Backbone features of every batch, concatenated in iteration order (N, d), no grad.

    Runs in eval mode (dropout off: the cache is the frozen backbone's deterministic output) and
    restores the previous mode. ``batches``: e.g. a non-shuffling DataLoader, or ``x.split(n)``;
    ``select(batch)`` picks the inputs out of a batch (default: the batch itself); ``device``
    where the cache lives (default: where the backbone puts it).
    """
    enc = encode or default_encode
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in batches:
                f = enc(backbone, select(batch) if select is not None else batch)
                out.append(f if device is None else f.to(device))
    finally:
        backbone.train(was_training)
    if not out:
        raise ValueError("no batches to cache")
    return torch.cat(out)


def adapter_step(
    adapter: nn.Module,
    feats_q: Tensor,
    feats_t: Tensor,
    batch_indices: Tensor,
    loss: LossFn,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    target_indices: Tensor | None = None,
    target_adapter: nn.Module | None = None,
    chunk_size: int | None = None,
    **loss_kwargs: Any,
) -> float:
    """Phase 2: one adapter step on a (very) large batch of cached features.

    Queries are ``feats_q[batch_indices]``, targets ``feats_t[target_indices]`` (default
    ``batch_indices``; append hard-negative rows to ``target_indices`` and pass ``labels``).
    ``loss(q, t, **loss_kwargs)`` should be a tiled loss (:func:`trainers.losses.contrastive_loss`,
    :class:`trainers.losses.TiledContrastiveLoss`) so that B x T logits are never stored;
    ``chunk_size`` additionally runs the adapter through GradCache for adapters too big to
    apply to the whole batch at once.
    """
    t_idx = batch_indices if target_indices is None else target_indices
    fq, ft = feats_q[batch_indices], feats_t[t_idx]
    t_adapter = target_adapter or adapter
    if chunk_size is not None:
        gc = GradCache(adapter, target_adapter, loss_fn=loss, chunk_size=chunk_size)
        return _optimise(optimizer, lambda: gc.step(fq, ft, **loss_kwargs))

    def run() -> float:
        value = loss(adapter(fq), t_adapter(ft), **loss_kwargs)
        value.backward()
        return float(value.detach())

    return _optimise(optimizer, run)


# --------------------------------------------------------------------------- phase 3


def transfer_step(
    backbone: nn.Module,
    adapter: nn.Module,
    query_inputs: Any,
    target_inputs: Any,
    loss: LossFn,
    *,
    chunk_size: int,
    optimizer: torch.optim.Optimizer | None = None,
    encode: Encode | None = None,
    target_backbone: nn.Module | None = None,
    target_adapter: nn.Module | None = None,
    train_adapter: bool = False,
    **loss_kwargs: Any,
) -> float:
    """Phase 3: the full-batch loss gradient at the backbone outputs (through the adapter),
    pushed into the backbone ``chunk_size`` examples at a time.

    Exactly GradCache with the adapter inside the loss: the backbone is encoded in no-grad
    chunks (RNG recorded), ``loss(adapter(F_q), adapter(F_t))`` is differentiated w.r.t. the
    features ``F``, and each chunk is re-encoded under its RNG state to backprop
    ``<features, dL/dF>``. The adapter is frozen unless ``train_adapter`` (then it receives its
    full-batch gradient too, and ``optimizer`` should hold its parameters).
    """
    t_adapter = target_adapter or adapter

    def loss_fn(fq: Tensor, ft: Tensor, **kw: Any) -> Tensor:
        return loss(adapter(fq), t_adapter(ft), **kw)

    gc = GradCache(backbone, target_backbone, loss_fn=loss_fn, chunk_size=chunk_size, encode=encode)
    frozen = contextlib.nullcontext() if train_adapter else _frozen(adapter, target_adapter)
    with frozen:
        return _optimise(optimizer, lambda: gc.step(query_inputs, target_inputs, **loss_kwargs))


# --------------------------------------------------------------------------- resumability


@dataclass
class PhaseState:
    """Where a three-phase run stands: ``phase`` (1 cotrain, 2 adapt, 3 transfer, 4 done) and
    ``step`` (steps completed within it). ``schedule`` = steps per phase (0 skips a phase);
    ``extra`` holds small JSON-able caller values (epoch, seeds, metrics).

    >>> s = PhaseState(schedule=(2, 0, 1))
    >>> [(s.advance(), (s.phase, s.step))[1] for _ in range(3)]
    [(1, 1), (3, 0), (4, 0)]
    >>> s.done
    True
    """

    phase: int = 1
    step: int = 0
    schedule: tuple[int, int, int] = (0, 0, 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.schedule = tuple(int(n) for n in self.schedule)  # type: ignore[assignment]
        self._skip_empty()

    @property
    def done(self) -> bool:
        return self.phase > 3

    @property
    def name(self) -> str:
        return PHASES.get(self.phase, "done")

    def _skip_empty(self) -> None:
        while not self.done and self.step >= self.schedule[self.phase - 1]:
            self.phase, self.step = self.phase + 1, 0

    def advance(self) -> None:
        """Count one finished step; move on to the next non-empty phase when this one is over."""
        if self.done:
            raise RuntimeError("all phases are finished")
        self.step += 1
        self._skip_empty()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseState:
        schedule = tuple(int(n) for n in d["schedule"])
        return cls(phase=int(d["phase"]), step=int(d["step"]),
                   schedule=schedule, extra=dict(d.get("extra", {})))  # type: ignore[arg-type]


def _rng_state() -> dict[str, Any]:
    in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if in_use else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    path: str | os.PathLike[str],
    state: PhaseState,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    rng: bool = True,
) -> Path:
    """Write state, module and optimiser ``state_dict``s, RNG state (``rng``) and ``tensors``
    (e.g. the phase-2 feature cache, or skip it: a frozen backbone recomputes it exactly)
    atomically (temporary file, then rename: a crash never leaves a half checkpoint)."""
    path = Path(path)
    payload = {
        "phase_state": state.to_dict(),
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "tensors": dict(tensors or {}),
        "rng": _rng_state() if rng else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    rng: bool = True,
    map_location: Any = None,
) -> tuple[PhaseState, dict[str, Tensor]]:
    """Restore what :func:`save_checkpoint` wrote into the given objects (same keys); returns
    the :class:`PhaseState` and the saved tensors. ``rng`` restores the CPU/CUDA generators,
    so dropout continues exactly as in an uninterrupted run."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=False)
    for k, m in modules.items():
        m.load_state_dict(payload["modules"][k])
    for k, o in (optimizers or {}).items():
        o.load_state_dict(payload["optimizers"][k])
    if rng and payload.get("rng") is not None:
        torch.set_rng_state(payload["rng"]["cpu"])
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return PhaseState.from_dict(payload["phase_state"]), dict(payload["tensors"])
