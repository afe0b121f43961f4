import numpy as np
import pytest

from hwexp.data.split import official_split, random_split, split_samples, writer_disjoint_split
from hwexp.errors import ConfigError


def etl_like(writers=50, classes=20):
    w = np.repeat([f"W{i}" for i in range(writers)], classes)
    c = np.tile([chr(0x3042 + i) for i in range(classes)], writers)
    return w, c


def test_writer_split_is_disjoint_covering_and_near_fractions():
    writers, labels = etl_like()
    s = writer_disjoint_split(writers, labels, val=0.1, test=0.2, seed=3)
    all_idx = np.concatenate([s.train, s.val, s.test])
    assert sorted(all_idx.tolist()) == list(range(len(labels)))
    sets = [set(writers[i]) for i in (s.train, s.val, s.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(sets[1]) == 5 and len(sets[2]) == 10


def test_writer_split_is_stratified_when_writers_cover_different_classes():
    rng = np.random.default_rng(0)
    writers, labels = [], []
    for w in range(60):
        own = rng.choice(10, size=5, replace=False)  # each writer wrote half the classes
        for c in own:
            writers += [f"W{w}"] * 4
            labels += [str(c)] * 4
    writers, labels = np.array(writers), np.array(labels)
    s = writer_disjoint_split(writers, labels, val=0.2, test=0.2, seed=0)
    for c in np.unique(labels):
        total = (labels == c).sum()
        share = (labels[s.test] == c).sum() / total
        assert 0.05 < share < 0.4


def test_writer_split_seeded():
    writers, labels = etl_like()
    a = writer_disjoint_split(writers, labels, 0.1, 0.1, seed=1)
    b = writer_disjoint_split(writers, labels, 0.1, 0.1, seed=1)
    c = writer_disjoint_split(writers, labels, 0.1, 0.1, seed=2)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.test, c.test)


def test_random_split_stratified_fractions():
    writers, labels = etl_like(writers=10, classes=5)
    s = random_split(labels, val=0.1, test=0.2, seed=0)
    for c in np.unique(labels):
        assert (labels[s.test] == c).sum() == 2 and (labels[s.val] == c).sum() == 1


def test_official_split_uses_partition():
    official = np.array(["train"] * 30 + ["test"] * 10)
    labels = np.array(list("ab") * 20)
    s = official_split(official, labels, val=0.2, seed=0)
    assert s.test.tolist() == list(range(30, 40))
    assert len(s.val) == 6 and set(s.train) | set(s.val) == set(range(30))


def test_errors_name_the_option():
    writers, labels = etl_like(writers=2)
    with pytest.raises(ConfigError, match="at least 3 writers"):
        writer_disjoint_split(writers, labels, 0.1, 0.1, 0)
    with pytest.raises(ConfigError, match="val=0.6, test=0.6"):
        random_split(labels, 0.6, 0.6, 0)
    with pytest.raises(ConfigError, match="only kmnist and k49"):
        split_samples("official", writers, labels, {}, 0.1, 0.1, 0, source="etl8g")
    with pytest.raises(ConfigError, match="split.method='bogus'"):
        split_samples("bogus", writers, labels, {}, 0.1, 0.1, 0)
