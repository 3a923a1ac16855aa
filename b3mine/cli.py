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

from b3mine.config import EmbeddingSource, MiningConfig, NegativesConfig
from b3mine.errors import B3MineError
from b3mine.flag_errors import guard_config_errors

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


def _default(text: str, field: str) -> str:
    """Help text with the `MiningConfig` default (the flags default to None so that they
    override a --config file only when given)."""
    value: Any = MiningConfig()
    for part in field.split("."):
        value = getattr(value, part)
    return f"{text} (default {value})"


@app.command()
def mine(
    embeddings: Annotated[Optional[Path], typer.Option(
        help="Parquet file/dir or .npy of teacher embeddings (or --texts)")] = None,
    texts: Annotated[Optional[Path], typer.Option(
        help="text pairs (Parquet/JSONL/CSV/datasets folder): embedded first, then mined")] = None,
    mixture: Annotated[Optional[Path], typer.Option(
        help="TOML/JSON list of datasets: one plan, every batch from one dataset")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        help="--texts: sentence-transformers model path or cached name (default: packaged "
             "all-MiniLM-L6-v2)")] = None,
    query_column: Annotated[str, typer.Option(help="--texts: query text column")] = "query",
    target_column_text: Annotated[str, typer.Option(
        "--text-target-column", help="--texts: target text column")] = "target",
    query_prompt: Annotated[Optional[str], typer.Option(help="--texts: query prompt")] = None,
    document_prompt: Annotated[Optional[str], typer.Option(
        help="--texts: document prompt")] = None,
    embeddings_out: Annotated[Optional[Path], typer.Option(
        help="--texts: where the embeddings go (default <out>/.embeddings/<name>-<hash>.parquet)"
    )] = None,
    out: Annotated[Path, typer.Option(help="directory that holds plans")] = Path("plans"),
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", exists=True, dir_okay=False,
        help="JSON/TOML MiningConfig; flags below override it")] = None,
    id_column: str = "id",
    column: Annotated[str, typer.Option(help="embedding column")] = "embedding",
    target_column: Annotated[Optional[str], typer.Option(help="paired data: target column")] = None,
    target_path: Annotated[Optional[Path], typer.Option(help="paired data: target file")] = None,
    ids_path: Annotated[Optional[Path], typer.Option(help=".npy input: aligned id file")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=_default("examples per batch, B", "batch_size"))] = None,
    cluster_size: Annotated[Optional[int], typer.Option(
        help=_default("examples per cluster, K (B % K == 0)", "cluster_size"))] = None,
    p: Annotated[Optional[int], typer.Option("--p", help=_default("skip the top p ranks",
                                                                  "p"))] = None,
    m: Annotated[Optional[int], typer.Option("--m", help=_default("keep ranks [p, p+m)",
                                                                  "m"))] = None,
    algorithm: Annotated[Optional[str], typer.Option(
        help=_default("kaminpar | metis | louvain | igraph-louvain | leiden", "algorithm"))] = None,
    graph: Annotated[Optional[str], typer.Option(
        help=_default("mutual | symmetric", "graph"))] = None,
    index: Annotated[Optional[str], typer.Option(
        help=_default("flat | ivf | hnsw | torch", "neighbours.index"))] = None,
    nprobe: Annotated[Optional[int], typer.Option(
        help=_default("IVF lists probed", "neighbours.nprobe"))] = None,
    negatives_mode: Annotated[Optional[str], typer.Option(
        "--negatives", help=_default("none | hnps | hnips", "negatives.mode"))] = None,
    negatives_k: Annotated[Optional[int], typer.Option(
        "--k-neg", help=_default("extra negatives per example", "negatives.k"))] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_default("epochs", "epochs"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_default("seed", "seed"))] = None,
    remainder: Annotated[Optional[str], typer.Option(
        help=_default("drop | fill", "remainder"))] = None,
    last_batch: Annotated[Optional[str], typer.Option(
        help=_default("drop | fill", "last_batch"))] = None,
    batch_grouping: Annotated[Optional[str], typer.Option(
        help=_default("random | affinity", "batch_grouping"))] = None,
    curriculum: Annotated[Optional[float], typer.Option(
        help=_default("share of the plan's batches that go from random to hard (set --epochs "
                      "to the training's length)", "curriculum"))] = None,
    engine: Annotated[str, typer.Option(help="local | dask")] = "local",
    region_size: Annotated[Optional[int], typer.Option(
        help="dask: mine regions of at most this many rows in parallel (default: one global "
             "graph)")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or a LocalCluster)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="dask LocalCluster workers")] = None,
) -> None:
    """Mine a batch plan from teacher embeddings and print its report."""
    base = MiningConfig.from_file(config_file) if config_file else MiningConfig()
    top = {k: v for k, v in dict(batch_size=batch_size, cluster_size=cluster_size, p=p, m=m,
                                 algorithm=algorithm, graph=graph, epochs=epochs, seed=seed,
                                 remainder=remainder, last_batch=last_batch,
                                 batch_grouping=batch_grouping, region_size=region_size,
                                 curriculum=curriculum).items()
           if v is not None}
    nb = {k: v for k, v in dict(index=index, nprobe=nprobe).items() if v is not None}
    ng = {k: v for k, v in dict(mode=negatives_mode, k=negatives_k).items() if v is not None}
    data = base.model_dump()
    data.update(top)
    data["neighbours"].update(nb)
    data["negatives"].update(ng)
    config = MiningConfig.model_validate(data)  # one validation: errors name the whole path
    if sum(x is not None for x in (embeddings, texts, mixture)) != 1:
        raise typer.BadParameter("give exactly one of --embeddings, --texts and --mixture")
    options = {k: v for k, v in dict(
        scheduler=scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"), workers=workers).items()
        if v is not None} if engine != "local" else {}
    from b3mine.progress import RichProgress

    with RichProgress() as progress:
        source: Any
        if mixture is not None:
            from b3mine.mixture import Mixture

            source = Mixture.from_file(mixture)
        elif texts is not None:
            from b3mine.teacher import EmbedOptions, default_output, embed
            from b3mine.texts import TextSource

            # --id-column keeps its default "id": use it when the texts have one, else derive.
            text_source = TextSource(path=str(texts), query_column=query_column,
                                     target_column=target_column_text,
                                     id_column=None if id_column == "id" else id_column)
            result = embed(text_source, embeddings_out or default_output(texts, out),
                           teacher=teacher, progress=progress, options=EmbedOptions(
                               query_prompt=query_prompt, document_prompt=document_prompt))
            source = result.source
        else:
            source = EmbeddingSource(
                path=str(embeddings), id_column=id_column, column=column,
                target_column=target_column, target_path=str(target_path) if target_path else None,
                ids_path=str(ids_path) if ids_path else None,
            )
        if mixture is not None and engine == "local":
            from b3mine.mixture import mine_mixture

            plan = mine_mixture(source, config, out, progress=progress)
        else:
            plan = run_engine(engine, source, config, out, options, progress)
    console.print(f"[green]plan[/green] {plan.path}")
    print_report(plan.path)


@app.command("embed")
def embed_command(
    texts: Annotated[Path, typer.Argument(help="Parquet / JSONL / CSV / TSV file, or a folder "
                                               "saved with datasets' save_to_disk")],
    out: Annotated[Path, typer.Option(help="output Parquet file of embeddings")],
    teacher: Annotated[Optional[str], typer.Option(
        help="sentence-transformers model: a local path or a name in the Hugging Face cache "
             "(never downloaded); default the packaged all-MiniLM-L6-v2")] = None,
    query_column: str = "query",
    target_column: Annotated[str, typer.Option(help="target text column")] = "target",
    single_corpus: Annotated[bool, typer.Option(help="no target column: embed one text per row"
                                                )] = False,
    id_column: Annotated[Optional[str], typer.Option(
        help="id column (default: 'id' if present, else ids derived from the texts)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split of a saved DatasetDict")] = None,
    query_prompt: Optional[str] = None,
    document_prompt: Optional[str] = None,
    max_seq_length: Optional[int] = None,
    precision: Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(help="texts per forward pass")] = 64,
    shard_rows: Annotated[int, typer.Option(help="rows per resumable shard")] = 4096,
    keep_texts: Annotated[bool, typer.Option(help="keep the texts in the output")] = True,
    keep_shards: Annotated[bool, typer.Option(help="keep the shard files after assembly")] = False,
) -> None:
    """Embed text pairs with a teacher into a Parquet file that `b3mine mine` reads."""
    from b3mine.teacher import EmbedOptions, embed
    from b3mine.progress import RichProgress
    from b3mine.texts import TextSource

    source = TextSource(path=str(texts), query_column=query_column,
                        target_column=None if single_corpus else target_column,
                        id_column=id_column, split=split)
    options = EmbedOptions.model_validate(dict(
        query_prompt=query_prompt, document_prompt=document_prompt, max_seq_length=max_seq_length,
        precision=precision, device=device, batch_size=batch_size))
    with RichProgress() as progress:
        result = embed(source, out, teacher=teacher, options=options, shard_rows=shard_rows,
                       keep_texts=keep_texts, keep_shards=keep_shards, progress=progress)
    what = "unchanged, reused" if result.cached else (
        f"{result.encoded} encoded, {result.resumed} resumed, {result.reused} reused")
    console.print(f"[green]embeddings[/green] {result.path}: {result.n_rows:,} rows, dim "
                  f"{result.dim}, {result.shards} shard(s) ({what})")
    column = "query_embedding --target-column target_embedding" if result.paired else "embedding"
    console.print(f"mine it: b3mine mine --embeddings {result.path} --column {column}")


@app.command("export")
def export_command(
    plan_dir: Annotated[Path, typer.Argument(help="a plan directory")],
    out: Annotated[Path, typer.Option(help="st: a folder (datasets save_to_disk); jsonl: a file")],
    format: Annotated[str, typer.Option(help="st (anchor/positive/negative_i) | jsonl "
                                             "(FlagEmbedding query/pos/neg)")] = "st",
    texts: Annotated[Optional[Path], typer.Option(
        help="the plan's texts, when its embeddings file holds none")] = None,
    query_column: str = "query",
    target_column: str = "target",
    epoch: Annotated[Optional[list[int]], typer.Option(help="export these epochs (default "
                                                            "all, in order)")] = None,
    negatives: Annotated[Optional[int], typer.Option(
        "--k-neg", help="negatives per row (default: the plan's k); short lists filled "
                        "in-batch")] = None,
) -> None:
    """Write a plan's rows, in plan order, as a sentence-transformers dataset or JSONL."""
    from b3mine.export import export_plan
    from b3mine.texts import TextSource

    source = TextSource(path=str(texts), query_column=query_column,
                        target_column=target_column) if texts else None
    path = export_plan(plan_dir, out, format=format, texts=source, epochs=epoch or None,
                       negatives=negatives)
    console.print(f"[green]export[/green] {path} (rows in plan order; keep batches of the "
                  "plan's batch_size unshuffled to keep its batch boundaries)")


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


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def print_report(plan_dir: Path) -> None:
    from b3mine.plan import BatchPlan

    plan = BatchPlan.open(plan_dir)
    c, q = plan.manifest.counts, plan.report()
    t = Table(title=f"plan {plan.plan_id}", show_header=False)
    cfg = plan.config
    t.add_row("examples", f"{plan.manifest.dataset.n_rows:,} (dim {plan.manifest.dataset.dim}, "
              f"{'paired' if plan.manifest.dataset.paired else 'single corpus'})")
    negatives = (f", {cfg.negatives.mode.upper()} k={cfg.negatives.k}"
                 if cfg.negatives.mode != "none" else "")
    t.add_row("config", f"{cfg.algorithm}, K={cfg.cluster_size}, B={cfg.batch_size}, "
              f"p={cfg.p}, m={cfg.m}, {cfg.graph} graph, {cfg.batch_grouping} grouping, "
              f"index={cfg.neighbours.index}{negatives}")
    if (mix := plan.manifest.mixture) is not None:
        t.add_row("datasets", f"rule {mix.rule}: " + ", ".join(
            f"{d.name} {d.n_rows:,} rows x {d.batches_per_epoch} batches" for d in mix.datasets))
    t.add_row("graph", f"{c.n_edges:,} edges")
    t.add_row("clusters", f"{c.n_clusters:,} of {c.cluster_size} "
              f"(dropped {c.remainder_dropped}, padded {c.remainder_padded})")
    t.add_row("batches", f"{c.batches_per_epoch:,} per epoch x {plural(c.epochs, 'epoch')}; "
              f"{c.examples_per_epoch[0]:,} examples in epoch 0")
    if q:
        for name in ("plan", "random"):
            s = q[name]
            t.add_row(f"{name} batches", f"sim mean {s['mean']:.4f}  p50 {s['p50']:.4f}  "
                      f"p90 {s['p90']:.4f}  p99 {s['p99']:.4f}  "
                      f"above-positive {100 * s['above_positive_share']:.3f}%")
        # The difference of means is defined for every plan; a ratio is not (random batches'
        # mean similarity can be ~0 or negative, which makes "-4.67x random" out of noise).
        t.add_row("hardness", f"mean in-batch similarity {q['plan']['mean']:+.4f} vs "
                  f"{q['random']['mean']:+.4f} random: {q['mean_similarity_gain']:+.4f}")
        t.add_row("plot", str(Path(plan.path) / "report.png"))
    skipped = plan.manifest.stats.get("skipped_stages", [])
    if skipped:
        t.add_row("resumed", f"skipped {', '.join(skipped)}: done by an earlier run of this "
                  f"job (its checkpoints were reused)")
    timings = plan.manifest.stats.get("timings", {})
    if timings:
        t.add_row("seconds" + (" (this run)" if skipped else ""),
                  ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
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
    from b3mine.demo import cached_demo_embeddings, default_cache_dir, demo_embeddings

    console.print("[bold]demo corpus[/bold]: Python standard-library docstrings, "
                  "teacher all-MiniLM-L6-v2 (packaged, offline)")
    sample = {"max_pairs": max_pairs} if max_pairs else {}
    cached = cached_demo_embeddings(**sample)
    if cached is None:
        console.print(f"first run: the teacher embeds every pair on the CPU, which takes "
                      f"minutes (progress bar below); the embeddings are then cached in "
                      f"{default_cache_dir()} and later runs start at once")
    path = demo_embeddings(**sample)  # at once when cached (and refreshes the fast lookup)
    console.print(f"embeddings: {path}" + (" (cached: nothing to embed)" if cached else ""))
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


def main(argv: list[str] | None = None) -> None:
    _register_plugins()
    command = guard_config_errors(typer.main.get_command(app))
    try:
        command.main(args=argv, prog_name="b3mine")
    except B3MineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
