"""Configuration of a mining run: one frozen object instead of thirty keyword arguments.

The same `MiningConfig` is used by the Python API, the CLI, the Dask pipeline and the REST
service (it is the body of `POST /v1/jobs`), so a plan id derived from it means the same thing
everywhere.

>>> from b3mine import MiningConfig
>>> cfg = MiningConfig(batch_size=256, cluster_size=32, p=30, m=100, algorithm="metis")
>>> cfg.clusters_per_batch
8
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from b3mine.errors import InputError

IndexKind = Literal["flat", "ivf", "hnsw", "torch"]
Algorithm = Literal["metis", "kaminpar", "louvain", "igraph-louvain", "leiden"]
KaMinParPreset = Literal["largek-fast", "largek", "largek-strong", "largek-eco", "default", "fast",
                         "strong", "eco", "terapart", "terapart-largek", "terapart-eco"]
Policy = Literal["drop", "fill"]
NegativeMode = Literal["none", "hnps", "hnips"]


class FrozenConfig(BaseModel):
    """Base of every configuration object: immutable, unknown keys refused, non-finite numbers
    (inf, NaN: JSON ``Infinity``) refused, loadable from a file."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Read a config from JSON (or TOML when the file ends in .toml)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise InputError(f"not valid TOML: {exc}", file=str(path)) from exc
            return cls.model_validate(data)
        return cls.model_validate_json(text)


class NeighbourConfig(FrozenConfig):
    """How the teacher's rank lists are computed."""

    index: IndexKind = Field(
        "flat", description="flat = exact (FAISS, or torch on a GPU); ivf/hnsw approximate; "
        "torch = exact blocked GEMM in torch"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto uses the torch GPU path when CUDA is present"
    )
    block_size: int = Field(8192, ge=1, description="queries searched per block (bounds memory)")
    nlist: int | None = Field(None, ge=1, description="IVF lists; default 4*sqrt(N)")
    nprobe: int = Field(16, ge=1, description="IVF lists probed per query")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node")
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(128, ge=8, description="HNSW search beam; must be >= the rank depth")
    train_per_list: int = Field(
        40, ge=1, description="IVF k-means training points per list (FAISS warns under 39)"
    )
    kmeans_iters: int = Field(10, ge=1, description="IVF k-means iterations")
    threads: int | None = Field(None, ge=1, description="FAISS OpenMP threads; None = all cores")


class NegativesConfig(FrozenConfig):
    """Extra hard negatives per example, as in B3 (HNPS / HNIPS).

    HNPS is the default, as in B3, and on the quality benchmark it is the plan option that
    trains the better retriever (README); ``mode="none"`` gives batches only."""

    mode: NegativeMode = "hnps"
    k: int = Field(5, ge=1, description="extra negatives per example (K_neg)")
    depth: int = Field(100, ge=1, description="rank depth past p that candidates are drawn from")
    positive_filter: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="drop a candidate scoring above this share of the positive's teacher score "
        "(NV-Retriever TopK-PercPos); None disables",
    )


class MiningConfig(FrozenConfig):
    """Everything that decides a plan. Two equal configs on the same data give the same plan."""

    batch_size: int = Field(1024, ge=1, description="examples per global batch (B)")
    cluster_size: int = Field(32, ge=1, description="examples per cluster (K); B % K == 0")
    p: int = Field(30, ge=0, description="skip the teacher's top p ranks (likely false negatives)")
    m: int = Field(100, ge=1, description="keep ranks [p, p+m) as graph edges")
    graph: Literal["mutual", "symmetric"] = Field(
        "mutual", description="mutual keeps i-j only if both rank each other (B3)"
    )
    algorithm: Algorithm = Field(
        "kaminpar", description="kaminpar (default: fast, exact sizes, lower edge cut), metis "
        "(B3's own choice, for parity), louvain, igraph-louvain, leiden"
    )
    resolution: float = Field(0.05, gt=0, description="Leiden CPM resolution")
    kaminpar_preset: KaMinParPreset = Field(
        "largek-fast", description="KaMinPar context preset (kaminpar.context_by_name)"
    )
    kaminpar_threads: int = Field(
        1, ge=1, description="KaMinPar threads; more than one is faster but not reproducible"
    )
    remainder: Policy = Field(
        "drop",
        description="examples left over after forming clusters of exactly K: drop them, or fill "
        "the last cluster with random other examples (flagged as padding in the plan)",
    )
    last_batch: Policy = Field(
        "drop",
        description="an epoch's incomplete last batch: drop it, or fill it with random clusters "
        "from the epoch's other batches (flagged as padding)",
    )
    batch_grouping: Literal["random", "affinity"] = Field(
        "random",
        description="which clusters share a batch: random (B3), or clusters linked by many "
        "graph edges (harder batches); re-drawn each epoch either way",
    )
    region_size: int | None = Field(
        None, ge=1,
        description="Dask engine: cut the corpus into regions of at most this many rows and mine "
        "them in parallel (b3mine.regions); None = one global graph",
    )
    near_duplicates: float | None = Field(
        None, gt=0, le=1,
        description="before clustering, leave out all but one row of each group whose teacher "
        "query-query or target-target cosine reaches this (they would be false negatives of "
        "each other); None keeps every row",
    )
    similarity_cap: float | None = Field(
        None, gt=-1, le=1,
        description="no batch pairs a query with another row's target of teacher cosine above "
        "this: offending rows are swapped with rows of other batches; None = no cap",
    )
    batch_mix: float = Field(
        0.0, ge=0, le=1,
        description="share of each batch's rows exchanged for random rows of the epoch "
        "(0 = plan batches, 1 = random batches)",
    )
    curriculum: float = Field(
        0.0, ge=0, le=1,
        description="share of the plan's batches (in training order) over which the random "
        "share falls linearly from 1 to batch_mix: random early, hard later; 0 = off",
    )
    epochs: int = Field(1, ge=1, description="epochs in the plan; batches are re-drawn each epoch")
    seed: int = Field(0, ge=0, description="seeds every random choice: same seed, same plan")
    normalize: bool = Field(True, description="L2-normalise embeddings (cosine similarity)")
    neighbours: NeighbourConfig = NeighbourConfig()
    negatives: NegativesConfig = NegativesConfig()

    @model_validator(mode="after")
    def _check(self) -> MiningConfig:
        if self.batch_size % self.cluster_size:
            raise ValueError(
                f"batch_size must be a multiple of cluster_size "
                f"(got batch_size={self.batch_size}, cluster_size={self.cluster_size})"
            )
        if self.region_size is not None and self.region_size < self.cluster_size:
            raise ValueError(f"region_size must be at least cluster_size (got region_size="
                             f"{self.region_size}, cluster_size={self.cluster_size})")
        return self

    @property
    def clusters_per_batch(self) -> int:
        return self.batch_size // self.cluster_size

    @property
    def rank_depth(self) -> int:
        """How many ranks per row must be searched: the window, and the negatives' pool."""
        depth = self.p + self.m
        if self.negatives.mode != "none":
            depth = max(depth, self.p + self.negatives.depth)
        return depth

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def of(cls, config: MiningConfig | dict | None) -> MiningConfig:
        """A config from a config, a dict of its fields (validated) or None (the defaults)."""
        if config is None:
            return cls()
        return config if isinstance(config, cls) else cls.model_validate(config)

    def check_fits(self, n_rows: int, source: str) -> None:
        """Refuse data this config cannot mine into a meaningful plan (InputError, one line):
        fewer rows than one batch, or a rank window [p, p+m) that does not fit in the rows
        (p >= N gives no edges at all). One check for the CLI, the API, and every engine."""
        if n_rows < self.batch_size:
            raise InputError("too few examples for one full batch", file=source,
                             expected=f">= batch_size = {self.batch_size} rows", got=f"{n_rows}")
        if self.p + self.m > n_rows:
            raise InputError("the rank window [p, p+m) does not fit in the rows", file=source,
                             expected=f"p + m <= {n_rows} rows",
                             got=f"p={self.p}, m={self.m}")

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def result_json(self) -> str:
        """`canonical_json` without the settings that cannot change a plan (the neighbour
        block size: the rank lists are in canonical order whatever the blocking)."""
        data = self.model_dump(mode="json")
        del data["neighbours"]["block_size"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


class EmbeddingSource(FrozenConfig):
    """Where the teacher embeddings are, and which columns hold what.

    Parquet: one file (or a directory of files) with an id column and a `list<float32>` or
    `fixed_size_list<float32>[d]` column; paired data adds a target column, or a second file.
    NumPy: `.npy` (memory-mapped) with an aligned id file (`.npy` or one id per line `.txt`).
    """

    path: str
    id_column: str = "id"
    column: str = "embedding"
    target_column: str | None = Field(None, description="paired data: the target embedding column")
    target_path: str | None = Field(None, description="paired data: targets in a second file")
    ids_path: str | None = Field(None, description=".npy input: the aligned id file")
