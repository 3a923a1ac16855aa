"""Real corpora for the quality benchmark: WordNet 3.0 term -> definition pairs.

WordNet ships as a Debian package (``apt-get install wordnet-base``: ``/usr/share/wordnet/
data.{noun,verb,adj,adv}``, 117,659 synsets). Each synset becomes one pair:

* ``id``      part of speech + byte offset, e.g. ``n02084071`` (stable across machines);
* ``query``   the synset's lemmas, underscores as spaces, joined by ", " (``dog, domestic dog,
  Canis familiaris``);
* ``target``  the gloss's definition, without its quoted examples (``a member of the genus
  Canis ...``).

Polysemy makes the corpus a hard case for false negatives: a lemma like "bank" that is the
only lemma of several synsets gives identical queries with different definitions, so any
batch holding two of them has a negative that is a correct answer to the query.

Splits are by a salted hash of the id (`trainers.train.data.held_out`), so they are stable
and never depend on the subset size: ``test`` (10%, salt "test") is written to its own file
and never seen by training or model selection; the rest (``dev``) is what ``b3mine train
--data`` reads, and the trainer's own held-out split of it (salt "heldout",
``TrainConfig.eval_fraction``) is the **validation** split used to choose hyper-parameters
and the early-stopping step.

    python benchmarks/corpora.py --max-pairs 60000     # dev + test Parquet, embedded once
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDNET_ROOT = Path("/usr/share/wordnet")
POS_FILES = ("noun", "verb", "adj", "adv")
TEST_FRACTION = 0.10
TEST_SALT = "test"
# Queries are a few lemmas, definitions ~10-25 word pieces; 64 tokens keep all but the longest
# definitions whole and make embedding ~2x faster than the demo's 128 on 2 CPU cores.
MAX_SEQ_LENGTH = 64
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on some adjective lemmas


def wordnet_available(root: Path = WORDNET_ROOT) -> bool:
    return all((root / f"data.{pos}").is_file() for pos in POS_FILES)


def parse_data_line(line: str) -> tuple[str, str, str] | None:
    """(id, query, target) of one ``data.<pos>`` line, None for the licence header.

    Format (wndb(5)): ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt ... |
    gloss``. The definition is the gloss up to its first quoted example.

    >>> parse_data_line('00003939 00 a 01 dying 0 003 ! 00003356 a 0101 | in the process of '
    ...                 'passing from life; "a dying man"')
    ('a00003939', 'dying', 'in the process of passing from life')
    """
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
    lemmas: list[str] = []
    for word in fields[4 : 4 + 2 * w_cnt : 2]:
        lemma = _ADJ_MARKER.sub("", word).replace("_", " ")
        if lemma not in lemmas:
            lemmas.append(lemma)
    definition = re.split(r';\s*"', gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
    if not lemmas or not definition:
        return None
    return f"{ss_type}{offset}", ", ".join(lemmas), definition


def wordnet_pairs(root: Path = WORDNET_ROOT) -> list[tuple[str, str, str]]:
    """Every synset of WordNet as (id, query, target), sorted by id."""
    if not wordnet_available(root):
        raise FileNotFoundError(f"WordNet data files not found under {root} "
                                "(apt-get install wordnet-base)")
    pairs = []
    for pos in POS_FILES:
        with open(root / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            pairs.extend(p for p in map(parse_data_line, f) if p is not None)
    return sorted(pairs)


def split_ids(ids: np.ndarray, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean mask of the test rows (salted id hash; the same rule the trainer uses)."""
    from trainers.train.data import held_out

    return held_out(np.asarray(ids), test_fraction, salt=TEST_SALT)


@dataclass(frozen=True)
class CorpusFiles:
    dev: Path  # train + validation: what `b3mine train --data` reads
    test: Path  # held-out test pairs, same columns
    n_pairs: int


def build_wordnet(out_dir: Path, max_pairs: int | None = None, *, root: Path = WORDNET_ROOT,
                  max_seq_length: int = MAX_SEQ_LENGTH, progress: bool = True) -> CorpusFiles:
    """Write ``dev`` and ``test`` Parquet files of WordNet pairs with teacher embeddings.

    Embedded once with the packaged all-MiniLM-L6-v2 (`b3mine.demo.embed_corpus`); the file
    names hash the pairs and the settings, so a second call reuses them."""
    import pyarrow.parquet as pq

    from b3mine.demo import DocPair, _table, _versions, embed_corpus, load_teacher
    from b3mine.teacher import write_atomic
    from trainers.train.data import subsample

    rows = wordnet_pairs(root)
    ids = np.array([r[0] for r in rows])
    if max_pairs is not None and max_pairs < len(rows):
        rows = [rows[i] for i in subsample(ids, max_pairs)]
    pairs = [DocPair(*r) for r in rows]
    h = hashlib.sha256(f"wordnet-v1\0{max_seq_length}\0{_versions()}\0".encode())
    for p in pairs:
        h.update(f"{p.id}\0{p.query}\0{p.target}\0".encode())
    key = h.hexdigest()[:16]
    out_dir = Path(out_dir)
    files = CorpusFiles(out_dir / f"wordnet-{len(pairs)}-{key}-dev.parquet",
                        out_dir / f"wordnet-{len(pairs)}-{key}-test.parquet", len(pairs))
    if files.dev.is_file() and files.test.is_file():
        return files
    model = load_teacher()
    model.max_seq_length = max_seq_length
    q, t = embed_corpus(pairs, batch_size=128, progress=progress, model=model)
    test = split_ids(np.array([p.id for p in pairs]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, mask in ((files.dev, ~test), (files.test, test)):
        sel = np.flatnonzero(mask)
        table = _table([pairs[i] for i in sel], q[sel], t[sel], key)
        write_atomic(path, lambda tmp, table=table: pq.write_table(table, tmp))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(".b3mine/corpora"))
    a = ap.parse_args(argv)
    files = build_wordnet(a.out, a.max_pairs)
    print(f"{files.n_pairs} pairs\ndev:  {files.dev}\ntest: {files.test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
