"""Phases 2 and 3 of three-phase adapter training (ALGORITHMS.md §6), after the main loop.

Phase 1 is the main loop itself (backbone + adapter co-trained on ``batch_size`` batches from
the configured sampler). Then, with `trainers.adapter` from the methods library:

2. **adapt**: the backbone is frozen; its features of every train query and target are cached
   once (`cache_features`) and the adapter alone takes ``adapter_steps`` steps on random
   batches of ``adapter_batch_size`` cached rows (`adapter_step`, tiled loss);
3. **transfer**: ``transfer_steps`` steps of `transfer_step` on random batches of
   ``transfer_batch_size``: the full-batch loss gradient at the backbone outputs, through the
   (frozen) adapter, backpropagated into the backbone ``transfer_chunk`` rows at a time.

Large batches are random (a fresh permutation per pass, seeded), not plan batches: the point
of the phases is batch size, and plans are mined for one batch size. The phase position
(`PhaseState`) is in the checkpoint; a resumed run recomputes the feature cache (the frozen
backbone gives the same features) and continues at the next phase step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.train.batching import RandomBatchSampler
from trainers.train.objectives import import_method


def _batches(n: int, size: int, seed: int, phase: int, step: int) -> np.ndarray:
    """Rows of phase ``phase``'s batch number ``step`` (a pure function: resumable)."""
    size = min(size, n)
    s = RandomBatchSampler(n, size, seed=seed * 1000 + phase)
    per = s.batches_per_epoch
    return s.batches(step // per)[step % per]


def run_adapter_phases(trainer: Any, log: Any) -> None:
    """Run what is left of phases 2-3 on ``trainer`` (a `trainers.train.loop.Trainer`)."""
    PhaseState = import_method("trainers.adapter", "PhaseState", "adapter phases")
    cache_features = import_method("trainers.adapter", "cache_features", "adapter phases")
    adapter_step = import_method("trainers.adapter", "adapter_step", "adapter phases")
    transfer_step = import_method("trainers.adapter", "transfer_step", "adapter phases")
    cfg = trainer.config.adapter
    model = trainer.model
    if model.adapter is None:
        raise ValueError("adapter phases need a model built with an adapter")
    state = trainer.phase_state or PhaseState(schedule=(0, cfg.adapter_steps, cfg.transfer_steps))
    trainer.phase_state = state
    if trainer.phase_optimizers is None:
        trainer.phase_optimizers = _optimizers(trainer)
    n = trainer.n_train
    objective = trainer.objective

    def loss(q: Tensor, k: Tensor, *, indices: Tensor) -> Tensor:
        # Adapter outputs are not normalised yet; the objectives expect unit vectors.
        return objective(F.normalize(q, dim=-1), F.normalize(k, dim=-1), None, indices)

    feats: tuple[Tensor, Tensor] | None = None
    while not state.done:
        rows = torch.as_tensor(_batches(n, cfg.adapter_batch_size if state.phase == 2
                                        else cfg.transfer_batch_size, trainer.config.seed,
                                        state.phase, state.step))
        if state.phase == 2:
            if feats is None:  # the frozen backbone's features, once per (resumed) phase
                feats = (cache_features(model.backbone, trainer.q_tokens.split(512)),
                         cache_features(model.backbone, trainer.t_tokens.split(512)))
            value = adapter_step(model.adapter, feats[0], feats[1], rows, loss,
                                 optimizer=trainer.phase_optimizers["adapt"], indices=rows)
        else:
            value = transfer_step(model.backbone, model.adapter, trainer.q_tokens[rows],
                                  trainer.t_tokens[rows], loss, chunk_size=cfg.transfer_chunk,
                                  optimizer=trainer.phase_optimizers["transfer"], indices=rows)
        name = state.name
        state.advance()
        trainer.step += 1
        log.write({"type": "train", "phase": name, "step": trainer.step, "loss": round(value, 6),
                   "lr": cfg.adapter_lr if name == "adapt" else cfg.transfer_lr})
        if trainer.config.checkpoint_every and trainer.step % trainer.config.checkpoint_every == 0:
            trainer.save(trainer.output_dir)


def _optimizers(trainer: Any) -> dict[str, torch.optim.Optimizer]:
    cfg, model = trainer.config.adapter, trainer.model
    return {"adapt": torch.optim.AdamW(model.adapter.parameters(), lr=cfg.adapter_lr),
            "transfer": torch.optim.AdamW(model.backbone.parameters(), lr=cfg.transfer_lr)}


def restore_phases(trainer: Any, saved: dict[str, Any]) -> None:
    """Put a checkpoint's phase position and phase optimisers back on ``trainer``."""
    PhaseState = import_method("trainers.adapter", "PhaseState", "adapter phases")
    trainer.phase_state = PhaseState.from_dict(saved["state"])
    trainer.phase_optimizers = _optimizers(trainer)
    for name, opt in trainer.phase_optimizers.items():
        opt.load_state_dict(saved["optimizers"][name])
