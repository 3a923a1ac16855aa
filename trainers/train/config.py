"""`TrainConfig`: every knob of a reference-trainer run in one frozen object.

The CLI (`b3mine train`), the quality benchmark and the tests all build one of these; a
checkpoint stores it, so a resumed run can refuse to continue under a different config.

>>> from trainers.train.config import TrainConfig
>>> cfg = TrainConfig(batch_size=32, steps=100)
>>> cfg.plan_cluster_size, cfg.sampler
(8, 'plan')
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import Field, model_validator

from b3mine.config import FrozenConfig

ModelKind = Literal["student", "static", "minilm"]
Objective = Literal["infonce", "sogclr", "em"]
SamplerKind = Literal["plan", "random", "kmeans"]

# Peak learning rate per model when ``lr`` is None. The static student's was chosen on a
# validation split carved out of the demo train split (docs/reference-trainer.md).
DEFAULT_LR: dict[str, float] = {"student": 2e-3, "static": 3e-2, "minilm": 2e-5}
# InfoNCE temperature per model when ``temperature`` is None: the static student's (0.1) won
# on the WordNet validation split at B=256 for every sampler (README, quality benchmark).
DEFAULT_TEMPERATURE: dict[str, float] = {"student": 0.05, "static": 0.1, "minilm": 0.05}




class AdapterConfig(FrozenConfig):
    """Three-phase adapter training (ALGORITHMS.md §6), run after the main steps.

    Phase 1 is the main loop (backbone + adapter on ``batch_size`` batches). Phase 2 freezes the
    backbone, caches its features once and trains the adapter alone on ``adapter_batch_size``
    batches. Phase 3 transfers large-batch gradients into the backbone by segmented backprop.
    """

    adapter_steps: int = Field(0, ge=0, description="phase 2 steps (0 disables phases 2 and 3)")
    adapter_batch_size: int = Field(1024, ge=2, description="phase 2 batch (cached features)")
    adapter_lr: float = Field(1e-3, gt=0)
    transfer_steps: int = Field(0, ge=0, description="phase 3 steps")
    transfer_batch_size: int = Field(1024, ge=2)
    transfer_lr: float = Field(2e-4, gt=0, description="phase 3 backbone learning rate")
    transfer_chunk: int = Field(128, ge=1, description="phase 3 backbone segment size")


class TrainConfig(FrozenConfig):
    """One training run of the reference dual encoder."""

    # -- data ----------------------------------------------------------------------------------
    data: str | None = Field(None, description="Parquet with id, query_text, target_text, "
                             "query_embedding, target_embedding; None = the demo corpus")
    max_pairs: int | None = Field(None, ge=16, description="use only this many pairs (tests)")
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="held out by id hash")
    max_length: int = Field(128, ge=8, description="tokens per text")

    # -- model ---------------------------------------------------------------------------------
    model: ModelKind = Field("static", description="student = EmbeddingBag+Linear from scratch "
                             "over the MiniLM vocabulary (fast on CPU); static = the model2vec "
                             "distillation of all-MiniLM-L6-v2 (pretrained, fast on CPU); "
                             "minilm = fine-tune all-MiniLM-L6-v2 (slow, GPU)")
    student_dim: int = Field(256, ge=8, description="student token-embedding width")
    static_dim: int = Field(256, ge=8, description="static student: PCA width of the "
                            "distillation (each width is distilled once and cached)")
    embed_dim: int = Field(256, ge=8, description="student output width")

    # -- objective -----------------------------------------------------------------------------
    objective: Objective = "infonce"
    temperature: float | None = Field(None, gt=0, description="InfoNCE temperature; SogCLR/EM "
                                      "tau; None = DEFAULT_TEMPERATURE of the model")
    symmetric: bool = Field(True, description="InfoNCE: average query->target and target->query")
    gamma: float = Field(0.9, gt=0, le=1, description="SogCLR moving-average weight")
    em_momentum: float = Field(0.9, ge=0, lt=1, description="EM: running Z estimate momentum")
    gradcache_chunk: int | None = Field(None, ge=1, description="GradCache chunk (None = off)")
    guide_margin: float | None = Field(None, description="teacher-guided in-batch masking "
                                       "(GISTEmbed): drop an in-batch negative whose teacher "
                                       "similarity exceeds the positive's minus this absolute "
                                       "margin; None = off. InfoNCE only")

    # -- batches -------------------------------------------------------------------------------
    sampler: SamplerKind = Field("plan", description="plan = B3 plan; random; kmeans = "
                                 "TAS-style batches from a few k-means topic clusters")
    plan: str | None = Field(None, description="plan directory or service URL "
                             "http://host/v1/plans/<id>; None = mine one on the train split")
    plans_dir: str = Field(".b3mine/plans", description="where mined train-split plans go")
    cluster_size: int | None = Field(None, ge=1, description="K for the mined plan and for "
                                     "k-means (avg); None = batch_size // 4, at most 32")
    p: int = Field(10, ge=0, description="mined plan: skip the teacher's top p ranks")
    m: int = Field(100, ge=1, description="mined plan: keep ranks [p, p+m)")
    batch_grouping: Literal["random", "affinity"] = "affinity"
    hard_negatives: bool | None = Field(None, description="add the plan's HNPS negatives as "
                                        "targets; None = when the plan has them (a plan "
                                        "b3mine train mines itself has them)")
    curriculum: float = Field(0.5, ge=0, le=1, description="the plan b3mine train mines "
                              "itself: over this share of the steps its batches go from random "
                              "to plan batches (0 = off; a given --plan keeps its own)")

    # -- re-mining during training (trainers.remine) -------------------------------------------
    remine_every: int = Field(0, ge=0, description="re-mine the plan with the student's "
                              "embeddings every n steps (0 = never)")
    remine_lag: int = Field(0, ge=0, description="steps a refresh may take: its plan takes "
                            "over at the first sampler epoch boundary this many steps after it "
                            "started (training waits there if it is not ready)")
    remine_teacher_weight: float = Field(0.0, ge=0, lt=1, description="mine on a*teacher + "
                                         "(1-a)*student cosine (0 = the student alone)")
    remine_mode: Literal["refresh", "probe"] = Field("refresh", description="probe = only "
                                                     "log how hard the batches are for the "
                                                     "student, every remine_every steps")
    remine_service: str | None = Field(None, description="mine refreshes as jobs of this "
                                       "service (http://host:port); None = in this process")
    remine_service_data: str | None = Field(None, description="the service's data root as "
                                            "this machine mounts it (refresh embeddings are "
                                            "written under it)")

    # -- optimisation --------------------------------------------------------------------------
    batch_size: int = Field(128, ge=2)
    steps: int = Field(400, ge=1)
    lr: float | None = Field(None, gt=0, description="peak learning rate; None = DEFAULT_LR of "
                             "the model (student 2e-3 from scratch, static 3e-2, MiniLM 2e-5)")
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warm-up")
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch threads; None = usable cores")
    adapter: AdapterConfig = AdapterConfig()

    # -- output --------------------------------------------------------------------------------
    output_dir: str = ".b3mine/runs/train"
    eval_every: int = Field(0, ge=0, description="evaluate every n steps (0 = at the end only)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every n steps (0 = at end)")
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.plan_cluster_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of cluster_size "
                             f"{self.plan_cluster_size}")
        if self.guide_margin is not None and self.objective != "infonce":
            raise ValueError(f"guide_margin (teacher-guided masking) needs objective='infonce', "
                             f"got objective={self.objective!r}")
        if self.guide_margin is not None and not math.isfinite(self.guide_margin):
            raise ValueError(f"guide_margin must be a finite number, got {self.guide_margin}")
        if self.hard_negatives and self.sampler != "plan":
            raise ValueError("hard_negatives needs sampler='plan' (the negatives come from it)")
        if self.remine_every and self.sampler != "plan":
            raise ValueError("remine_every needs sampler='plan' (a refresh mines a new plan)")
        if self.remine_service and not self.remine_service_data:
            raise ValueError("remine_service needs remine_service_data, the service's data root "
                             "as this machine sees it (the student's embeddings go there)")
        return self

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.model]

    @property
    def loss_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_TEMPERATURE[self.model]

    @property
    def plan_cluster_size(self) -> int:
        """K: explicit, else B/4 capped at 32 (4 clusters a batch at B=32 and B=128)."""
        if self.cluster_size is not None:
            return self.cluster_size
        return max(1, min(32, self.batch_size // 4))

    def digest(self) -> str:
        """Hash of everything that changes the trajectory (not output paths or progress bars)."""
        data = self.model_dump(mode="json", exclude={"output_dir", "progress", "eval_every",
                                                     "checkpoint_every", "threads", "plans_dir",
                                                     # where a refresh is mined, not what
                                                     "remine_service", "remine_service_data"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
