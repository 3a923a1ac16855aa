"""The training objectives behind one small interface.

``objective(q, k, labels, indices) -> loss`` with ``q`` (B, d) unit-norm query embeddings,
``k`` (T, d) target embeddings (T >= B: the batch's positives, then any hard negatives),
``labels`` (B,) the positive column of each query and ``indices`` (B,) the train-row index of
each query (SogCLR and EM keep per-example state indexed by it). ``state_dict`` holds those
buffers so that checkpoints resume them.

* ``infonce``: `trainers.losses.TiledContrastiveLoss` (exact InfoNCE, tiled; symmetric by
  default), temperature fixed; with ``guide_margin`` set, the loop passes the teacher
  embeddings of the batch rows as ``guide_q`` / ``guide_k`` (teacher-guided masking).
* ``sogclr``: `trainers.losses.sogclr.SogCLRLoss` (ALGORITHMS.md §4).
* ``em``: `trainers.losses.em.GradientBiasEMLoss` (ALGORITHMS.md §5).

The last two live in the methods library; when it is not installed yet they fail with an
ImportError that says so, instead of silently training something else.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from trainers.train.config import TrainConfig


class MethodUnavailable(ImportError):
    """A method the config asks for is not in this checkout of `trainers` yet."""


def import_method(module: str, name: str, what: str) -> Any:
    """``module.name``, or a `MethodUnavailable` naming the config option that needs it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MethodUnavailable(f"{what} needs {module}.{name}, which is not available in this "
                                f"checkout ({e}); use objective='infonce' / no GradCache / no "
                                f"adapter phases, or update trainers") from e


class Objective(nn.Module):
    """Wraps a loss module; ``needs_indices`` tells the loop to pass dataset rows."""

    def __init__(self, name: str, loss: nn.Module, needs_indices: bool) -> None:
        super().__init__()
        self.name, self.loss, self.needs_indices = name, loss, needs_indices

    def forward(self, q: Tensor, k: Tensor, labels: Tensor | None = None,
                indices: Tensor | None = None, guide_q: Tensor | None = None,
                guide_k: Tensor | None = None) -> Tensor:
        if guide_q is not None or guide_k is not None:
            if self.name != "infonce":
                raise ValueError(f"teacher-guided masking needs objective infonce, not "
                                 f"{self.name}")
            return self.loss(q, k, labels, guide_q=guide_q, guide_k=guide_k)
        if not self.needs_indices:
            return self.loss(q, k, labels)
        if indices is None:
            raise ValueError(f"objective {self.name} needs the batch's dataset indices")
        return self.loss(q, k, indices, labels)


def build_objective(config: TrainConfig, n_examples: int) -> Objective:
    if config.objective == "infonce":
        from trainers.losses import TiledContrastiveLoss

        margin = 0.0 if config.guide_margin is None else config.guide_margin
        return Objective("infonce", TiledContrastiveLoss(config.loss_temperature,
                                                         symmetric=config.symmetric,
                                                         guide_margin=margin), False)
    if config.objective == "sogclr":
        cls = import_method("trainers.losses.sogclr", "SogCLRLoss", "objective='sogclr'")
        return Objective("sogclr", cls(n_examples, tau=config.loss_temperature, gamma=config.gamma),
                         True)
    if config.objective == "em":
        cls = import_method("trainers.losses.em", "GradientBiasEMLoss", "objective='em'")
        return Objective("em", cls(n_examples, tau=config.loss_temperature,
                                   momentum=config.em_momentum), True)
    raise ValueError(f"unknown objective {config.objective!r}")


def as_index(rows: Any) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.long)
