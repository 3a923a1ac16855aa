"""The training loop: sampler -> batch -> encode -> loss -> step, with metrics, checkpoints,
evaluation and exact resume.

Files under ``config.output_dir``:

* ``config.json``   the `TrainConfig` of the run;
* ``metrics.jsonl`` one line per step ``{"type": "train", "step", "loss", "lr", "seconds"}``
  and per evaluation ``{"type": "eval", "step", "recall@1", "recall@10", "mrr"}``;
* ``checkpoint.pt`` model, optimizer, sampler position, loss buffers (SogCLR/EM) and the torch
  RNG state: ``train(config, resume=True)`` continues on the exact next batch, and on CPU gives
  the same losses as a run that was never interrupted;
* ``results.json``  final metrics, the teacher's metrics on the same held-out pairs, timings;
* ``tb/``           TensorBoard scalars, only when ``torch.utils.tensorboard`` imports.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from b3mine.cores import usable_cores
from trainers.train.config import TrainConfig
from trainers.train.data import PairData, load_pairs
from trainers.train.evaluate import evaluate_model, teacher_metrics
from trainers.train.models import DualEncoder, build_model
from trainers.train.objectives import Objective, build_objective, import_method
from trainers.train.sampling import build_sampler

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class RunResult:
    """What `train` returns: final held-out metrics and where the files are."""

    config: TrainConfig
    output_dir: Path
    steps: int
    metrics: dict[str, float]
    teacher: dict[str, float]
    seconds: float
    sampler: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # losses of the steps run in this call

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "metrics": self.metrics, "teacher": self.teacher,
                "seconds": round(self.seconds, 2), "sampler": self.sampler,
                "config": self.config.model_dump(mode="json")}


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = int(config.warmup * config.steps)
    if step < warm:
        return config.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def set_threads(threads: int | None, model: str = "student") -> None:
    """Intra-op threads: explicit, else $OMP_NUM_THREADS, else 1 for the student and one per
    usable core for MiniLM (the static student is a bag of embeddings too).

    The student's ops are tiny: measured on 2 shared cores (load ~3), one EmbeddingBag
    forward+backward at batch 256 took 4 ms on 1 thread and 50-170 ms on 2, the OpenMP threads
    waiting on each other whenever another process holds a core."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    if threads is None and model in ("student", "static"):
        threads = 1
    if threads is None:
        threads = usable_cores()
    torch.set_num_threads(max(1, threads))


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed). On resume, lines past the checkpoint's
    step are dropped: the steps they describe are about to be trained again."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / METRICS
        if resume_step is None or not self.path.is_file():
            self.path.write_text("")
        else:
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self._f = self.path.open("a")
        self._tb: Any = None
        try:  # optional: skipped quietly where tensorboard is not installed
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"))
        except Exception:
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            kind = record.get("type", "train")
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


@contextmanager
def _progress(enabled: bool, total: int, start: int) -> Iterator[Callable[[int, float], None]]:
    if not enabled:
        yield lambda step, loss: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=total, completed=start, loss="-")
        yield lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4f}")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


class Trainer:
    """One run's state. `train` is the function to call; this class keeps the pieces apart."""

    def __init__(self, config: TrainConfig, data: PairData | None = None) -> None:
        self.config = config
        set_threads(config.threads, config.model)
        torch.manual_seed(config.seed)
        self.data = data if data is not None else load_pairs(config)
        self.n_train = len(self.data.train)
        tr = self.data.train
        self.model: DualEncoder = build_model(config, self.data.vocab_size,
                                              (tr.query_tokens, tr.target_tokens))
        self.objective: Objective = build_objective(config, self.n_train)
        params = list(self.model.parameters()) + [
            p for p in self.objective.parameters() if p.requires_grad]
        # fused: one kernel per step instead of ~10 passes over each tensor; measured on a
        # 20k x 256 table (the static student's trainable rows), 1 thread: 16 ms vs 71 ms.
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                           weight_decay=config.weight_decay, fused=True)
        self.sampler, self.sampler_info = build_sampler(config, self.data)
        self.remine: Any = None  # trainers.remine.Refresher, with --remine-every
        if config.remine_every:
            from trainers.remine import for_trainer

            self.remine = for_trainer(self)
        self.gradcache = self._gradcache() if config.gradcache_chunk else None
        self.q_tokens = torch.as_tensor(self.data.train.query_tokens, dtype=torch.long)
        self.t_tokens = torch.as_tensor(self.data.train.target_tokens, dtype=torch.long)
        # Teacher embeddings of the train rows: the guide of teacher-guided masking.
        self.guide: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.guide_margin is not None:
            self.guide = (torch.as_tensor(self.data.train.query_emb),
                          torch.as_tensor(self.data.train.target_emb))
        self.step = 0
        self.epoch = 0
        self.output_dir = Path(config.output_dir)
        self.phase_state: Any = None  # adapter phases 2-3 (trainers.train.phases)
        self.phase_optimizers: dict[str, torch.optim.Optimizer] | None = None

    # -- pieces --------------------------------------------------------------------------------
    def _gradcache(self) -> Any:
        cls = import_method("trainers.gradcache", "GradCache", "gradcache_chunk")
        return cls(self.model, None, loss_fn=self._loss_on_reps,
                   chunk_size=self.config.gradcache_chunk)

    def _loss_on_reps(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None,
                      indices: torch.Tensor | None = None,
                      **guide: torch.Tensor) -> torch.Tensor:
        return self.objective(q, k, labels, indices, **guide)

    def _split(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query rows, target rows, labels) of one sampler list."""
        if getattr(self.sampler, "negatives", False):  # resolved by build_sampler
            from trainers.collate import split_hard_negatives

            b = split_hard_negatives(batch, self.config.batch_size)
            return b.query_rows, b.target_rows, b.labels
        rows = np.asarray(batch, dtype=np.int64)
        return rows, rows, np.arange(len(rows), dtype=np.int64)

    def train_step(self, batch: list[int]) -> float:
        qrows, trows, labels = self._split(batch)
        lr = lr_at(self.config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        q_in, t_in = self.q_tokens[qrows], self.t_tokens[trows]
        lab, idx = torch.as_tensor(labels), torch.as_tensor(qrows)
        guide = {} if self.guide is None else {"guide_q": self.guide[0][qrows],
                                               "guide_k": self.guide[1][trows]}
        self.optimizer.zero_grad(set_to_none=True)
        if self.gradcache is not None:
            value = float(self.gradcache.step(q_in, t_in, labels=lab, indices=idx, **guide))
        else:
            loss = self.objective(self.model(q_in), self.model(t_in), lab, idx, **guide)
            loss.backward()
            value = float(loss.detach())
        self.optimizer.step()
        return value

    def batches(self) -> Iterator[list[int]]:
        """Batches from the sampler's saved position on, across epochs, without end."""
        while True:
            self.sampler.set_epoch(self.epoch)
            yield from self.sampler
            self.epoch += 1

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "digest": self.config.digest(),
                "config": self.config.model_dump(mode="json"),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "objective": self.objective.state_dict(), "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "remine": self.remine.state_dict() if self.remine is not None else None,
                "phases": None if self.phase_state is None else {
                    "state": self.phase_state.to_dict(),
                    "optimizers": {k: o.state_dict()
                                   for k, o in (self.phase_optimizers or {}).items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["digest"] != self.config.digest():
            raise ValueError("the checkpoint was written by a run with a different config "
                             "(model, data, objective, sampler, steps or seed differ); use a "
                             "new output_dir or the same config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        if self.remine is not None:  # first: the sampler may be on one of its plans
            self.remine.load_state_dict(state["remine"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if state.get("phases"):
            from trainers.train.phases import restore_phases

            restore_phases(self, state["phases"])

    def save(self, out: Path) -> None:
        _atomic_save(self.state_dict(), out / CHECKPOINT)


def train(config: TrainConfig, *, resume: bool = False, data: PairData | None = None,
          stop_after: int | None = None) -> RunResult:
    """Run (or resume) one training run; returns its final held-out metrics.

    ``resume=True`` continues from ``output_dir/checkpoint.pt`` when it exists (and starts
    fresh otherwise). ``stop_after`` stops after that global step, checkpointing it, as if
    the run had been killed there (tests use it to check that resuming is exact).
    """
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, data)
    ckpt = out / CHECKPOINT
    resumed = resume and ckpt.is_file()
    if resumed:
        trainer.load_state_dict(torch.load(ckpt, weights_only=False))
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    log = MetricsLog(out, trainer.step if resumed else None)
    if not resumed:
        log.write({"type": "info", "step": 0, **trainer.sampler_info,
                   "n_train": trainer.n_train, "n_eval": len(trainer.data.eval),
                   "parameters": sum(p.numel() for p in trainer.model.parameters())})
    last = min(config.steps, stop_after if stop_after is not None else config.steps)
    losses: list[float] = []
    try:
        with _progress(config.progress, config.steps, trainer.step) as bar:
            batches = trainer.batches()
            while trainer.step < last:
                t0 = time.perf_counter()
                loss = trainer.train_step(next(batches))
                trainer.step += 1
                losses.append(loss)
                log.write({"type": "train", "step": trainer.step, "loss": round(loss, 6),
                           "lr": lr_at(config, trainer.step - 1),
                           "seconds": round(time.perf_counter() - t0, 4)})
                bar(trainer.step, loss)
                if trainer.remine is not None:
                    for event in trainer.remine.after_step(trainer.step):
                        log.write(event)
                if config.eval_every and trainer.step % config.eval_every == 0 \
                        and trainer.step < config.steps:
                    log.write({"type": "eval", "step": trainer.step,
                               **evaluate_model(trainer.model, trainer.data.eval)})
                if config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
                    trainer.save(out)
        trainer.save(out)
        if stop_after is None and trainer.step >= config.steps and (config.adapter.adapter_steps
                                             or config.adapter.transfer_steps):
            from trainers.train.phases import run_adapter_phases

            run_adapter_phases(trainer, log)
            trainer.save(out)
        metrics = evaluate_model(trainer.model, trainer.data.eval)
        log.write({"type": "eval", "step": trainer.step, **metrics})
    finally:
        for event in trainer.remine.close() if trainer.remine is not None else ():
            log.write(event)
        log.close()
    result = RunResult(config=config, output_dir=out, steps=trainer.step, metrics=metrics,
                       teacher=teacher_metrics(trainer.data.eval),
                       seconds=time.perf_counter() - start, sampler=trainer.sampler_info,
                       losses=losses)
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=2))
    return result
