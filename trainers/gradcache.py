"""GradCache / segmented backpropagation: the exact large-batch gradient at one chunk's memory.

A contrastive loss couples every example of the batch, so the usual trick of accumulating
gradients over micro-batches computes a *different* (small-batch) loss. GradCache (Gao et al.,
see ``/work/shared/ALGORITHMS.md`` section 3) keeps the large-batch loss exact:

1. encode the batch chunk by chunk **without** grad, recording each chunk's RNG state;
2. compute the full-batch loss on the detached representations (which require grad) and
   backpropagate to them: ``G = dL/dreps`` is the *gradient cache* (B x d, small);
3. re-encode each chunk **with** grad under its saved RNG state (so dropout draws the same
   masks) and backpropagate ``sum(reps_chunk * G_chunk)``: by the chain rule the parameter
   gradients summed over chunks are exactly ``dL/dtheta``.

Memory: one chunk's activations plus the (B, d) representations; cost: one extra forward.

Inputs can be tensors, mappings of tensors (tokenizer output), lists (of strings, of
examples) or tuples of such fields; everything is cut along the first dimension. Pass
``encode(model, chunk) -> Tensor`` when the model is not called as ``model(chunk)`` /
``model(**chunk)``.

>>> import torch
>>> from trainers.gradcache import GradCache
>>> from trainers.losses import contrastive_loss
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> enc = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Dropout(0.1))
>>> gc = GradCache(enc, loss_fn=lambda q, t: contrastive_loss(q, t, scale=10.0), chunk_size=3)
>>> x, y = torch.randn(8, 8), torch.randn(8, 8)
>>> loss = gc.step(x, y)          # parameters' .grad now hold the full-batch gradient
>>> isinstance(loss, float) and enc[0].weight.grad is not None
True
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Encode = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[..., Tensor]

__all__ = [
    "GradCache",
    "RNGState",
    "batch_size_of",
    "chunk_inputs",
    "default_encode",
    "encode_chunks",
    "segmented_backward",
]


# --------------------------------------------------------------------------- inputs


def batch_size_of(inputs: Any) -> int:
    """Number of examples in ``inputs`` (first dimension of a tensor / of a mapping's values)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError("empty input mapping")
        return batch_size_of(next(iter(inputs.values())))
    if isinstance(inputs, tuple):
        # A tuple is a set of aligned fields (ids, mask); a list is a list of examples.
        return batch_size_of(inputs[0])
    if isinstance(inputs, Sequence):
        return len(inputs)
    raise TypeError(f"cannot split inputs of type {type(inputs).__name__}; pass tensors, "
                    "mappings, lists or tuples of those")


def _slice(inputs: Any, start: int, end: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:end]
    if isinstance(inputs, Mapping):
        sliced = {k: _slice(v, start, end) for k, v in inputs.items()}
        try:  # keep the caller's mapping type (e.g. transformers' BatchEncoding) when possible
            return type(inputs)(sliced)
        except Exception:
            return sliced
    if isinstance(inputs, tuple):
        return tuple(_slice(v, start, end) for v in inputs)
    if isinstance(inputs, Sequence):
        return inputs[start:end]
    raise TypeError(f"cannot split inputs of type {type(inputs).__name__}")


def chunk_inputs(inputs: Any, chunk_size: int) -> list[Any]:
    """Cut ``inputs`` into consecutive chunks of at most ``chunk_size`` examples.

    >>> [c.tolist() for c in chunk_inputs(torch.arange(5), 2)]
    [[0, 1], [2, 3], [4]]
    >>> chunk_inputs({"ids": torch.zeros(3, 2)}, 2)[1]["ids"].shape
    torch.Size([1, 2])
    >>> chunk_inputs(["a", "b", "c"], 2)
    [['a', 'b'], ['c']]
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    n = batch_size_of(inputs)
    return [_slice(inputs, s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def default_encode(model: nn.Module, chunk: Any) -> Tensor:
    """``model(**chunk)`` for mappings, else ``model(chunk)``; a dict output must carry
    ``sentence_embedding`` (sentence-transformers convention)."""
    out = model(**chunk) if isinstance(chunk, Mapping) else model(chunk)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "sentence_embedding" in out:
        return out["sentence_embedding"]
    raise TypeError(f"model returned {type(out).__name__}; pass encode=... that returns a Tensor")


# --------------------------------------------------------------------------- RNG replay


@dataclass(frozen=True)
class RNGState:
    """CPU and (when initialised) per-device CUDA generator states before one chunk's forward."""

    cpu: Tensor
    cuda: tuple[Tensor, ...]

    @classmethod
    def capture(cls) -> RNGState:
        cuda: tuple[Tensor, ...] = ()
        # Only touch CUDA when it is already in use: capturing must not initialise a context.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the generators set to this state; restore the current ones after."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


# --------------------------------------------------------------------------- the three steps


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def encode_chunks(
    model: nn.Module, inputs: Any, chunk_size: int, encode: Encode | None = None,
) -> tuple[Tensor, list[RNGState]]:
    """Step 1: representations of every chunk without grad, and each chunk's RNG state.

    The RNG advances exactly as in one ordinary forward per chunk, so the training run's random
    stream does not depend on whether GradCache is used.
    """
    enc = encode or default_encode
    reps, states = [], []
    with torch.no_grad():
        for chunk in chunk_inputs(inputs, chunk_size):
            states.append(RNGState.capture())
            reps.append(enc(model, chunk))
    return torch.cat(reps), states


def segmented_backward(
    model: nn.Module,
    inputs: Any,
    grads: Tensor,
    *,
    chunk_size: int,
    encode: Encode | None = None,
    rng_states: Sequence[RNGState] | None = None,
    sync_last: bool = True,
) -> None:
    """Step 3: re-encode ``inputs`` chunk by chunk with grad and backprop ``<reps, grads>``.

    ``grads`` (B, d) is dL/d(reps) for the whole batch (the cache). Parameter ``.grad`` fields
    accumulate the exact full-batch gradient. ``rng_states`` (one per chunk, from
    :func:`encode_chunks`) replays dropout. Under DistributedDataParallel every chunk but the
    last runs in ``model.no_sync()``; ``sync_last=False`` keeps the last one local too (used
    when a shared tower has more chunks to come).

    >>> m = torch.nn.Linear(3, 2)
    >>> x = torch.randn(5, 3)
    >>> segmented_backward(m, x, torch.ones(5, 2), chunk_size=2)
    >>> torch.allclose(m.bias.grad, torch.full((2,), 5.0))
    True
    """
    enc = encode or default_encode
    chunks = chunk_inputs(inputs, chunk_size)
    if rng_states is not None and len(rng_states) != len(chunks):
        raise ValueError(f"{len(rng_states)} RNG states for {len(chunks)} chunks")
    if batch_size_of(inputs) != grads.shape[0]:
        raise ValueError(f"grads has {grads.shape[0]} rows for {batch_size_of(inputs)} inputs")
    start = 0
    for i, chunk in enumerate(chunks):
        n = batch_size_of(chunk)
        g = grads[start:start + n]
        start += n
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext()
        if _is_ddp(model) and not (last and sync_last):
            sync = model.no_sync()  # type: ignore[operator]
        replay = rng_states[i].replay() if rng_states is not None else contextlib.nullcontext()
        with sync:
            with replay:
                reps = enc(model, chunk)
            # <reps, G>: its gradient w.r.t. the parameters is J^T G, the chain-rule term.
            surrogate = (reps * g.to(reps.dtype)).sum()
            surrogate.backward()


class GradCache:
    """Exact large-batch contrastive gradients with memory of one chunk (see module doc).

    ``query_encoder`` / ``target_encoder`` are the two towers (``target_encoder=None``: one
    shared tower). ``loss_fn(q_reps, t_reps, **loss_kwargs) -> scalar`` is the full-batch loss
    (e.g. :func:`trainers.losses.contrastive_loss`, or a SogCLR / EM loss module, whose
    ``indices`` go through ``loss_kwargs``); its own parameters (a learnable temperature) get
    their gradient in step 2. :meth:`step` only fills ``.grad``; the caller zeroes gradients
    before and steps the optimiser after, as with a plain ``loss.backward()``.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        target_encoder: nn.Module | None = None,
        *,
        loss_fn: LossFn,
        chunk_size: int,
        encode: Encode | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.query_encoder = query_encoder
        self.target_encoder = target_encoder
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.encode = encode or default_encode

    @property
    def shared(self) -> bool:
        return self.target_encoder is None or self.target_encoder is self.query_encoder

    def step(self, query_inputs: Any, target_inputs: Any, **loss_kwargs: Any) -> float:
        """One GradCache pass; returns the full-batch loss value (parameters' ``.grad`` filled)."""
        t_model = self.query_encoder if self.shared else self.target_encoder
        assert t_model is not None
        q_reps, q_states = encode_chunks(self.query_encoder, query_inputs, self.chunk_size,
                                         self.encode)
        t_reps, t_states = encode_chunks(t_model, target_inputs, self.chunk_size, self.encode)
        q_leaf = q_reps.detach().requires_grad_()
        t_leaf = t_reps.detach().requires_grad_()
        loss = self.loss_fn(q_leaf, t_leaf, **loss_kwargs)
        loss.backward()
        # A side the loss does not touch still runs step 3 (zero cache) so DDP syncs as usual.
        q_grad = q_leaf.grad if q_leaf.grad is not None else torch.zeros_like(q_leaf)
        t_grad = t_leaf.grad if t_leaf.grad is not None else torch.zeros_like(t_leaf)
        # A shared DDP tower must all-reduce once, after the last target chunk.
        segmented_backward(self.query_encoder, query_inputs, q_grad, chunk_size=self.chunk_size,
                           encode=self.encode, rng_states=q_states, sync_last=not self.shared)
        segmented_backward(t_model, target_inputs, t_grad, chunk_size=self.chunk_size,
                           encode=self.encode, rng_states=t_states, sync_last=True)
        return float(loss.detach())
