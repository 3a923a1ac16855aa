"""One plan over several datasets: every batch from one dataset, datasets interleaved by a rule.

B3 and GritLM draw each batch from a single dataset: in-batch negatives from another dataset are
easy (another task, another domain) and teach little. A mixture plan keeps that convention:

* each dataset is mined on its own (its own neighbours, graph, clusters, batches, negatives), so
  clusters and batches never cross datasets; per dataset ``p`` and ``m`` may differ from the
  mining config's (the "window" settings);
* the plan's rows are the datasets' rows one after the other, in the order given (dataset ``d``
  holds rows ``[offset_d, offset_d + n_d)``); train on the concatenation of the datasets in that
  order, or match by id: a mixture's ids are ``"<dataset name>/<id>"``;
* every epoch holds ``q_d`` batches of dataset ``d``, placed by a seeded random interleaving
  (a fresh shuffle of the batch-to-dataset assignment each epoch; each dataset's own batches
  keep their mined order):

  - ``rule="size"`` (default): ``q_d`` = all of dataset ``d``'s batches, so datasets are drawn in
    proportion to their sizes (sentence-transformers' ``ProportionalBatchSampler``);
  - ``rule="weights"``: ``q_d`` proportional to the datasets' ``weight``. No example is repeated
    inside an epoch, so the epoch is as long as the scarcest dataset allows:
    ``T = floor(min_d(nb_d / share_d))`` batches, ``q_d = floor(share_d * T)`` with the
    remainder handed out by largest fractional part (ties: earlier dataset), capped at ``nb_d``;
    a dataset with more batches than its quota contributes a fresh random subset each epoch.

The manifest's ``mixture`` lists the datasets (row range, fingerprint, weight, p, m, batches per
epoch); clusters.parquet and batches.parquet carry a ``dataset`` column. The quality report
compares with random batches drawn inside each dataset in the same proportions. `mine_mixture`
mines the datasets one after the other; ``map_parts`` lets an engine run them in parallel
(``pipelines.mixture`` does it on Dask).

>>> counts_for_weights([10, 4, 30], [1.0, 1.0, 2.0])
[4, 4, 8]
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field, field_validator, model_validator

from b3mine import clustering
from b3mine.batches import Batches
from b3mine.config import EmbeddingSource, FrozenConfig, MiningConfig
from b3mine.embeddings import Embeddings, load_embeddings
from b3mine.errors import InputError
from b3mine.mining import (
    build_graph,
    compute_neighbours,
    finish_plan,
    make_batches,
    make_clusters,
    make_negatives,
    prepare,
)
from b3mine.plan import MANIFEST, BatchPlan, MixtureInfo, MixturePart, plan_id_for
from b3mine.progress import ProgressCallback, stage_progress
from b3mine.report import random_batches
from b3mine.texts import TextSource

MIXTURE_VERSION = 1
Rule = Literal["size", "weights"]


class MixtureDataset(FrozenConfig):
    """One dataset of a mixture: embeddings, or texts to embed first (with the mixture's
    teacher), and its own weight and window."""

    name: str = Field(min_length=1, description="unique; prefixes the dataset's ids")
    embeddings: EmbeddingSource | None = None
    texts: TextSource | None = None  # neither: in-memory inputs passed to mine_mixture
    weight: float | None = Field(None, gt=0, description="rule='weights': relative share")
    p: int | None = Field(None, ge=0, description="this dataset's p (default: the config's)")
    m: int | None = Field(None, ge=1, description="this dataset's m (default: the config's)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if "/" in name:
            raise ValueError(f"dataset name {name!r} must not contain '/' (ids are name/id)")
        return name

    @model_validator(mode="after")
    def _one_input(self) -> MixtureDataset:
        if self.embeddings is not None and self.texts is not None:
            raise ValueError(f"dataset {self.name!r}: give embeddings or texts, not both")
        return self


class Mixture(FrozenConfig):
    """The datasets of a mixture plan and how their batches are interleaved (module doc).

    As a TOML file (``b3mine mine --mixture mix.toml``)::

        rule = "weights"
        teacher = "models/my-teacher"        # for datasets given as texts (default: MiniLM)
        [[datasets]]
        name = "nq"
        embeddings = { path = "nq.parquet", column = "query_embedding",
                       target_column = "target_embedding" }
        weight = 2
        p = 10
        [[datasets]]
        name = "faq"
        texts = { path = "faq.jsonl", query_column = "question", target_column = "answer" }
        weight = 1
    """

    datasets: list[MixtureDataset] = Field(min_length=1)
    rule: Rule = "size"
    teacher: str | None = Field(None, description="teacher for datasets given as texts")

    @classmethod
    def from_file(cls, path: str | Path) -> Mixture:
        """Read a mixture from TOML/JSON; relative dataset paths are relative to the file."""
        mixture = super().from_file(path)
        base = Path(path).resolve().parent

        def rebase(src: Any) -> Any:
            if src is None:
                return None
            return src.model_copy(update={
                name: str(base / value) for name in ("path", "target_path", "ids_path")
                if isinstance(value := getattr(src, name, None), str)
                and not Path(value).is_absolute()})

        return mixture.model_copy(update={"datasets": [
            d.model_copy(update={"embeddings": rebase(d.embeddings), "texts": rebase(d.texts)})
            for d in mixture.datasets]})

    @model_validator(mode="after")
    def _check(self) -> Mixture:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        if self.rule == "weights" and any(d.weight is None for d in self.datasets):
            missing = [d.name for d in self.datasets if d.weight is None]
            raise ValueError(f"rule 'weights' needs a weight for every dataset; missing: "
                             f"{missing}")
        return self


def counts_for_weights(available: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Batches per epoch of each dataset under ``rule="weights"`` (module doc)."""
    avail = np.asarray(available, dtype=np.int64)
    share = np.asarray(weights, dtype=np.float64)
    share = share / share.sum()
    total = int(np.floor((avail / share).min() + 1e-9))
    exact = share * total
    counts = np.floor(exact + 1e-9).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return np.minimum(counts, avail).tolist()


def part_config(config: MiningConfig, ds: MixtureDataset, index: int) -> MiningConfig:
    """The config dataset ``ds`` is mined with: its window, and a seed of its own (datasets of
    equal size would otherwise get the same cluster permutations)."""
    seed = int.from_bytes(hashlib.sha256(f"{config.seed}\0{ds.name}".encode()).digest()[:4],
                          "little") >> 1
    data = config.model_dump()
    data.update(seed=seed, p=config.p if ds.p is None else ds.p,
                m=config.m if ds.m is None else ds.m)
    return MiningConfig.model_validate(data)


@dataclass(frozen=True)
class Part:
    """What mining one dataset gives (rows local to the dataset)."""

    clusters: clustering.Clusters
    batches: Batches
    negatives: np.ndarray | None
    graph: sp.csr_matrix


def mine_part(embeddings: Embeddings | EmbeddingSource, config: MiningConfig) -> Part:
    """The core stages on one dataset (the same functions ``b3mine.mining.mine`` runs)."""
    raw = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(embeddings)
    emb = prepare(raw, config)
    neighbours = compute_neighbours(emb, config)
    graph = build_graph(neighbours, config)
    clustered = make_clusters(graph, config)
    batches = make_batches(clustered, config, graph)
    negatives = make_negatives(emb, neighbours, clustered, config)
    return Part(clustered, batches, negatives, graph)


MapParts = Callable[[Callable[..., Part], list[tuple[Any, ...]]], list[Part]]


def _sequential(fn: Callable[..., Part], args: list[tuple[Any, ...]]) -> list[Part]:
    return [fn(*a) for a in args]


def _resolve(mixture: Mixture, out: Path, progress: ProgressCallback | None
             ) -> list[Embeddings | EmbeddingSource]:
    """Each dataset's embeddings: given, or its texts embedded (cached under ``out``, the
    teacher loaded once, and only when some dataset has texts left to encode)."""
    sources: list[Embeddings | EmbeddingSource] = []
    model = None
    for ds in mixture.datasets:
        if ds.embeddings is not None:
            sources.append(ds.embeddings)
            continue
        if ds.texts is None:
            raise InputError(f"dataset {ds.name!r} names no embeddings or texts "
                             "(in-memory datasets need inputs=)")
        from b3mine.teacher import EmbedJob, default_output, embed

        target = default_output(ds.texts.path, out)
        if model is None and (job := EmbedJob.plan(ds.texts, target,
                                                   teacher=mixture.teacher)).todo:
            model = job.load_model()
        sources.append(embed(ds.texts, target, teacher=mixture.teacher, model=model,
                             progress=progress).source)
    return sources


def mixture_fingerprint(mixture: Mixture, parts: Sequence[tuple[MixtureDataset, str]]) -> str:
    h = hashlib.sha256(f"b3mine-mixture-v{MIXTURE_VERSION}\0{mixture.rule}\0".encode())
    for ds, fingerprint in parts:
        h.update(f"{ds.name}\0{fingerprint}\0{ds.weight}\0{ds.p}\0{ds.m}\0".encode())
    return h.hexdigest()


def mine_mixture(
    mixture: Mixture | Sequence[MixtureDataset],
    config: MiningConfig | None = None,
    out: str | Path = "plans",
    *,
    inputs: Sequence[Embeddings] | None = None,
    progress: ProgressCallback | None = None,
    report: bool = True,
    map_parts: MapParts | None = None,
) -> BatchPlan:
    """Mine one plan over the mixture's datasets (module doc) under ``out/<plan_id>``.

    ``inputs``: in-memory `Embeddings`, one per dataset, instead of their files (the datasets'
    ``embeddings`` then only name them). The plan id hashes every dataset's fingerprint, the
    names, weights, windows, the rule and the config: equal inputs name one plan."""
    if not isinstance(mixture, Mixture):
        mixture = Mixture(datasets=list(mixture))
    config = config or MiningConfig()
    out = Path(out)
    sources = list(inputs) if inputs is not None else _resolve(mixture, out, progress)
    if len(sources) != len(mixture.datasets):
        raise InputError(f"{len(sources)} inputs for {len(mixture.datasets)} datasets")
    with stage_progress(progress, "load", len(sources)) as advance:
        loaded = []
        for src in sources:
            loaded.append(src if isinstance(src, Embeddings) else load_embeddings(src))
            advance(1)
    dims = {e.dim for e in loaded}
    if len(dims) > 1 or len({e.paired for e in loaded}) > 1:
        raise InputError("the datasets of a mixture need one teacher: same dimension and all "
                         "paired or all single-corpus", expected="one dimension",
                         got=", ".join(f"{d.name}: {e.dim}{' paired' if e.paired else ''}"
                                       for d, e in zip(mixture.datasets, loaded)))
    fingerprints = [e.fingerprint() for e in loaded]
    fingerprint = mixture_fingerprint(mixture, list(zip(mixture.datasets, fingerprints)))
    plan_id = plan_id_for(fingerprint, config)
    if (out / plan_id / MANIFEST).is_file():
        return BatchPlan.open(out / plan_id)
    configs = [part_config(config, ds, i) for i, ds in enumerate(mixture.datasets)]
    for ds, emb, cfg in zip(mixture.datasets, loaded, configs):
        try:
            prepare(emb, cfg)  # the one-full-batch check, per dataset, before any mining
        except InputError as exc:
            raise InputError(f"dataset {ds.name!r}: {exc}") from exc
    with stage_progress(progress, "datasets", 1):
        if map_parts is None:
            parts = _sequential(mine_part, [(e, c) for e, c in zip(loaded, configs)])
        else:  # another engine: hand it the files where there are files (smaller tasks)
            parts = map_parts(mine_part, [(s if isinstance(s, EmbeddingSource) else e, c)
                                          for e, s, c in zip(loaded, sources, configs)])
    return _combine(mixture, config, out, loaded, fingerprints, fingerprint, configs, parts,
                    progress=progress, report=report)


def _combine(mixture: Mixture, config: MiningConfig, out: Path, loaded: list[Embeddings],
             fingerprints: list[str], fingerprint: str, configs: list[MiningConfig],
             parts: list[Part], *, progress: ProgressCallback | None, report: bool
             ) -> BatchPlan:
    sizes = [e.n_rows for e in loaded]
    row_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cluster_offsets = np.concatenate([[0], np.cumsum([len(p.clusters.members) for p in parts])])
    available = [p.batches.batches_per_epoch for p in parts]
    if mixture.rule == "weights":
        counts = counts_for_weights(available, [d.weight or 0.0 for d in mixture.datasets])
    else:
        counts = available
    epochs, b = config.epochs, config.batch_size
    total = int(sum(counts))
    rows = np.empty((epochs, total, b), np.int64)
    cluster = np.empty((epochs, total, b), np.int32)
    padded = np.empty((epochs, total, b), bool)
    for e in range(epochs):
        rng = np.random.default_rng([config.seed, 0x313, e])
        slots = rng.permutation(np.repeat(np.arange(len(parts)), counts))
        for d, part in enumerate(parts):
            where = np.flatnonzero(slots == d)
            # weights: the first q_d of this epoch's batches, a fresh random subset each epoch
            rows[e, where] = part.batches.rows[e, : counts[d]] + row_offsets[d]
            cluster[e, where] = part.batches.cluster[e, : counts[d]] + cluster_offsets[d]
            padded[e, where] = part.batches.padded[e, : counts[d]]
    clustered = clustering.Clusters(
        members=np.concatenate([p.clusters.members + o for p, o in zip(parts, row_offsets)]),
        padded=np.concatenate([p.clusters.padded for p in parts]),
        dropped=np.concatenate([p.clusters.dropped + o for p, o in zip(parts, row_offsets)]),
        community_sizes=np.concatenate([p.clusters.community_sizes for p in parts]))
    negatives = None
    if parts[0].negatives is not None:
        negatives = np.concatenate([np.where(p.negatives >= 0, p.negatives + o, -1)
                                    for p, o in zip(parts, row_offsets)])
    names = np.array([d.name for d in mixture.datasets])
    emb = Embeddings.from_arrays(
        np.concatenate([np.char.add(f"{d.name}/", e.ids.astype(str))
                        for d, e in zip(mixture.datasets, loaded)]),
        np.concatenate([e.queries for e in loaded]),
        None if not loaded[0].paired else np.concatenate([e.targets for e in loaded]),
        source="mixture:" + "+".join(names), normalize=config.normalize)
    rng = np.random.default_rng([config.seed, 0x4E9, 1])
    baseline = np.concatenate([random_batches(n, b, max(q, 1), rng) + o
                               for n, q, o in zip(sizes, counts, row_offsets) if n >= b])
    info = MixtureInfo(rule=mixture.rule, datasets=[
        MixturePart(name=d.name, offset=int(o), n_rows=n, fingerprint=f,
                    source=None if isinstance(e, Embeddings) and e.source == "<memory>"
                    else e.source, weight=d.weight, p=c.p, m=c.m, batches_per_epoch=q)
        for d, o, n, f, e, c, q in zip(mixture.datasets, row_offsets, sizes, fingerprints,
                                       loaded, configs, counts)])
    graph = sp.block_diag([p.graph for p in parts], format="csr")
    return finish_plan(emb, fingerprint, config, graph, clustered,
                       Batches(rows=rows, cluster=cluster, padded=padded), negatives, out,
                       progress=progress, report=report, mixture=info,
                       dataset_names=np.repeat(names, sizes), random_rows=baseline)
