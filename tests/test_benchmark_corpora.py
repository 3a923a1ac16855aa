"""The quality benchmark's corpus: WordNet parsing and the train / validation / test split."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.corpora import (
    TEST_FRACTION,
    parse_data_line,
    split_ids,
    wordnet_available,
    wordnet_pairs,
)
from trainers.train.data import held_out


def _three_way(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) masks as the benchmark uses them: test first, then the
    trainer's own held-out split of the rest."""
    test = split_ids(ids)
    rest = ids[~test]
    val = np.zeros(len(ids), bool)
    val[np.flatnonzero(~test)[held_out(rest, 0.08)]] = True
    return ~test & ~val, val, test


def test_split_is_disjoint_stable_and_independent_of_the_subset():
    ids = np.array([f"n{i:08d}" for i in range(20_000)])
    train, val, test = _three_way(ids)
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    assert (train | val | test).all()
    assert abs(test.mean() - TEST_FRACTION) < 0.01 and abs(val[~test].mean() - 0.08) < 0.01
    # a pair's side depends on its id only: the same on a shuffled subset
    sub = np.random.default_rng(0).permutation(len(ids))[:5000]
    assert np.array_equal(split_ids(ids[sub]), test[sub])
    # the two salts are independent: test rows are not the trainer's held-out rows
    assert 0.04 < held_out(ids, 0.08)[test].mean() < 0.12


def test_parse_data_line_keeps_lemmas_and_the_definition_only():
    line = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a "
            "member of the genus Canis; \"the dog barked all night\"  \n")
    assert parse_data_line(line) == ("n02084071", "dog, domestic dog, Canis familiaris",
                                     "a member of the genus Canis")
    assert parse_data_line("  1 This software and database is being provided\n") is None
    adj = "00003700 00 s 01 ablaze(p) 0 000 | lighted up by or as if by fire  \n"
    assert parse_data_line(adj) == ("s00003700", "ablaze", "lighted up by or as if by fire")


@pytest.mark.skipif(not wordnet_available(), reason="wordnet-base is not installed")
def test_wordnet_corpus_is_large_and_its_split_disjoint():
    pairs = wordnet_pairs()
    assert len(pairs) > 100_000
    ids = np.array([p[0] for p in pairs[::20]])  # a sample keeps the hashing fast
    assert len(set(ids.tolist())) == len(ids)
    train, val, test = _three_way(ids)
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    assert np.array_equal(split_ids(ids), split_ids(ids.copy()))
