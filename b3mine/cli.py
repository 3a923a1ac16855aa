"""The ``b3mine`` command: mine, report, demo — and the sub-commands other packages contribute.

``pipelines/``, ``service/`` and ``trainers/`` register extra commands (``serve``, ``train``) and
engines (``--engine dask``) through the entry-point groups ``b3mine.commands`` and
``b3mine.engines``, so this core package never imports them.
"""
from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from b3mine.config import EmbeddingSource, MiningConfig, NegativesConfig, NeighbourConfig
from b3mine.errors import B3MineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hard-negative batch mining for contrastive learning (B3).")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep and logs


def _engines() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="b3mine.engines")}


def run_engine(engine: str, source: EmbeddingSource, config: MiningConfig, out: Path,
               options: dict[str, Any], progress, lineage: Any = None) -> Any:
    """Mine with the named engine: ``local`` (in-process) or one registered by entry point.
    ``lineage`` (a `b3mine.plan.PlanLineage`) is recorded in the plan's manifest."""
    if engine == "local":
        from b3mine.mining import mine

        return mine(source, config, out, progress=progress, lineage=lineage)
    if lineage is not None:
        options = {**options, "lineage": lineage}
    engines = _engines()
    if engine not in engines:
        raise typer.BadParameter(f"unknown engine {engine!r}; available: local, "
                                 f"{', '.join(sorted(engines)) or '(none installed)'}")
    return engines[engine].load()(source, config, out, progress=progress, **options)


@app.command()
def mine(
    embeddings: Annotated[Path, typer.Option(help="Parquet file/dir or .npy of teacher embeddings")],
    out: Annotated[Path, typer.Option(help="directory that holds plans")] = Path("plans"),
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON/TOML MiningConfig; "
                           "flags below override it")] = None,
    id_column: str = "id",
    column: Annotated[str, typer.Option(help="embedding column")] = "embedding",
    target_column: Annotated[Optional[str], typer.Option(help="paired data: target column")] = None,
    target_path: Annotated[Optional[Path], typer.Option(help="paired data: target file")] = None,
    ids_path: Annotated[Optional[Path], typer.Option(help=".npy input: aligned id file")] = None,
    batch_size: Optional[int] = None,
    cluster_size: Optional[int] = None,
    p: Annotated[Optional[int], typer.Option("--p", help="skip the top p ranks")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="keep ranks [p, p+m)")] = None,
    algorithm: Annotated[Optional[str], typer.Option(
        help="metis | louvain | igraph-louvain | leiden")] = None,
    graph: Annotated[Optional[str], typer.Option(help="mutual | symmetric")] = None,
    index: Annotated[Optional[str], typer.Option(help="flat | ivf | hnsw | torch")] = None,
    nprobe: Optional[int] = None,
    negatives: Annotated[Optional[str], typer.Option(help="none | hnps | hnips")] = None,
    k_neg: Optional[int] = None,
    epochs: Optional[int] = None,
    seed: Optional[int] = None,
    remainder: Annotated[Optional[str], typer.Option(help="drop | fill")] = None,
    last_batch: Annotated[Optional[str], typer.Option(help="drop | fill")] = None,
    batch_grouping: Annotated[Optional[str], typer.Option(help="random | affinity")] = None,
    engine: Annotated[str, typer.Option(help="local | dask")] = "local",
    scheduler: Annotated[Optional[str], typer.Option(
        help="dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or a LocalCluster)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="dask LocalCluster workers")] = None,
) -> None:
    """Mine a batch plan from teacher embeddings and print its report."""
    base = MiningConfig.from_file(config_file) if config_file else MiningConfig()
    top = {k: v for k, v in dict(batch_size=batch_size, cluster_size=cluster_size, p=p, m=m,
                                 algorithm=algorithm, graph=graph, epochs=epochs, seed=seed,
                                 remainder=remainder, last_batch=last_batch,
                                 batch_grouping=batch_grouping).items()
           if v is not None}
    nb = {k: v for k, v in dict(index=index, nprobe=nprobe).items() if v is not None}
    ng = {k: v for k, v in dict(mode=negatives, k=k_neg).items() if v is not None}
    data = base.model_dump()
    data.update(top)
    data["neighbours"] = NeighbourConfig(**{**data["neighbours"], **nb}).model_dump()
    data["negatives"] = NegativesConfig(**{**data["negatives"], **ng}).model_dump()
    config = MiningConfig.model_validate(data)
    source = EmbeddingSource(
        path=str(embeddings), id_column=id_column, column=column, target_column=target_column,
        target_path=str(target_path) if target_path else None,
        ids_path=str(ids_path) if ids_path else None,
    )
    options = {k: v for k, v in dict(
        scheduler=scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"), workers=workers).items()
        if v is not None} if engine != "local" else {}
    from b3mine.progress import RichProgress

    with RichProgress() as progress:
        plan = run_engine(engine, source, config, out, options, progress)
    console.print(f"[green]plan[/green] {plan.path}")
    print_report(plan.path)


@app.command()
def report(plan_dir: Annotated[Path, typer.Argument(help="a plan directory")],
           as_json: Annotated[bool, typer.Option("--json", help="print the JSON summary")] = False
           ) -> None:
    """Print a plan's counts and quality report (hardness vs random batches)."""
    if as_json:
        from b3mine.plan import BatchPlan

        plan = BatchPlan.open(plan_dir)
        console.print_json(json.dumps({"manifest": plan.manifest.model_dump(mode="json"),
                                       "report": plan.report()}))
        return
    print_report(plan_dir)


def print_report(plan_dir: Path) -> None:
    from b3mine.plan import BatchPlan

    plan = BatchPlan.open(plan_dir)
    c, q = plan.manifest.counts, plan.report()
    t = Table(title=f"plan {plan.plan_id}", show_header=False)
    cfg = plan.config
    t.add_row("examples", f"{plan.manifest.dataset.n_rows:,} (dim {plan.manifest.dataset.dim}, "
              f"{'paired' if plan.manifest.dataset.paired else 'single corpus'})")
    t.add_row("config", f"{cfg.algorithm}, K={cfg.cluster_size}, B={cfg.batch_size}, "
              f"p={cfg.p}, m={cfg.m}, {cfg.graph} graph, index={cfg.neighbours.index}")
    t.add_row("graph", f"{c.n_edges:,} edges")
    t.add_row("clusters", f"{c.n_clusters:,} of {c.cluster_size} "
              f"(dropped {c.remainder_dropped}, padded {c.remainder_padded})")
    t.add_row("batches", f"{c.batches_per_epoch:,} per epoch x {c.epochs} epochs; "
              f"{c.examples_per_epoch[0]:,} examples in epoch 0")
    if q:
        for name in ("plan", "random"):
            s = q[name]
            t.add_row(f"{name} batches", f"sim mean {s['mean']:.4f}  p50 {s['p50']:.4f}  "
                      f"p90 {s['p90']:.4f}  p99 {s['p99']:.4f}  "
                      f"above-positive {100 * s['above_positive_share']:.3f}%")
        ratio = q.get("mean_similarity_ratio")
        t.add_row("hardness", f"{ratio:.2f}x random (mean in-batch similarity)" if ratio
                  else f"gain {q['mean_similarity_gain']:+.4f} over random")
        t.add_row("plot", str(Path(plan.path) / "report.png"))
    timings = plan.manifest.stats.get("timings", {})
    if timings:
        t.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(t)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="directory that holds plans")] = Path(".b3mine/plans"),
    max_pairs: Annotated[Optional[int], typer.Option(help="subsample the corpus")] = None,
    batch_size: int = 256,
    cluster_size: int = 32,
    algorithm: str = "metis",
    seed: int = 0,
) -> None:
    """Embed the demo corpus (stdlib docstrings) with the packaged teacher, mine it, report."""
    from b3mine.demo import demo_embeddings

    console.print("[bold]demo corpus[/bold]: Python standard-library docstrings, "
                  "teacher all-MiniLM-L6-v2 (packaged, offline)")
    path = demo_embeddings(**({"max_pairs": max_pairs} if max_pairs else {}))
    console.print(f"embeddings: {path}")
    # A 4k-pair corpus: skip fewer ranks than B3's p=30 (tuned for millions), and fill each
    # batch with linked clusters (batch_grouping="affinity") rather than random ones.
    config = MiningConfig(batch_size=batch_size, cluster_size=cluster_size, algorithm=algorithm,
                          seed=seed, p=10, m=100, batch_grouping="affinity",
                          negatives=NegativesConfig(mode="hnps"))
    source = EmbeddingSource(path=str(path), column="query_embedding",
                             target_column="target_embedding")
    from b3mine.progress import RichProgress

    with RichProgress() as progress:
        plan = run_engine("local", source, config, out, {}, progress)
    console.print(f"[green]plan[/green] {plan.path}")
    print_report(plan.path)


def _register_plugins() -> None:
    for ep in entry_points(group="b3mine.commands"):
        try:
            command = ep.load()
        except ImportError as exc:  # an optional extra is not installed
            @app.command(name=ep.name, help=f"(unavailable: {exc})")
            def _missing(exc: ImportError = exc) -> None:  # noqa: B023
                raise typer.Exit(f"this command needs an optional extra: {exc}")
            continue
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=ep.name)
        else:
            app.command(name=ep.name)(command)


def main() -> None:
    _register_plugins()
    try:
        app()
    except B3MineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
