import filecmp

import numpy as np
import pytest

from wbclib import benchmarks as B
from wbclib import data


@pytest.fixture(scope="module")
def manifests(root):
    return data.drop_duplicates(data.all_manifests(root))


@pytest.fixture(scope="module")
def pbc_lt(manifests):
    return B.make_pbc_lt(manifests[manifests.source == "pbc"], seed=0)


def test_pbc_lt_is_seeded(manifests, pbc_lt):
    table, definition = pbc_lt
    again, definition2 = B.make_pbc_lt(manifests[manifests.source == "pbc"], seed=0)
    assert table.equals(again) and definition == definition2
    other, definition3 = B.make_pbc_lt(manifests[manifests.source == "pbc"], seed=1)
    assert not table["split"].equals(other["split"])
    assert sorted(definition.head_order) == sorted(B.PBC_LT_CLASSES)


def test_pbc_lt_test_share_and_folds(pbc_lt):
    table, _ = pbc_lt
    assert set(table.label) == set(B.PBC_LT_CLASSES)
    share = (table.split == "test").groupby(table.label).mean()
    assert np.allclose(share, 0.2, atol=0.01)
    cv = table[table.split == "cv"]
    assert sorted(cv.fold.unique()) == [0, 1, 2, 3, 4]
    assert (table[table.split == "test"].fold == -1).all()


def test_long_tail_profile():
    counts = B.long_tail_counts(list("abcdefghi"), 400, 100)
    assert counts["a"] == 400 and counts["i"] == 4
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert set(B.long_tail_counts(list("abc"), 50, 1).values()) == {50}


@pytest.mark.parametrize("rho", B.RHOS)
def test_split_follows_quotas_and_never_leaks(pbc_lt, rho):
    table, definition = pbc_lt
    split = B.pbc_lt_split(table, definition, rho, fold=2, n_max=100)
    train, val, test = (set(split[split.split == s].path) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    counts = split[split.split == "train"].label.value_counts()
    assert counts[definition.head_order[0]] == 100
    assert counts[definition.head_order[-1]] == max(1, round(100 / rho))
    assert (split.severity == 0).all()


def test_smaller_rho_train_contains_larger(pbc_lt):
    table, definition = pbc_lt
    trains = {rho: set(B.pbc_lt_split(table, definition, rho, 0).query("split == 'train'").path) for rho in B.RHOS}
    assert trains[100] <= trains[10] <= trains[1]


def test_phase2_and_severity_switches(pbc_lt):
    table, definition = pbc_lt
    test = B.pbc_lt_split(table, definition, 1, 0).query("split == 'test'")
    degraded = B.phase2(test)
    assert degraded.severity.between(1, 4).all() and set(degraded.degradation) <= {"salt_pepper", "gaussian_blur", "illumination"}
    fixed = B.at_severity(test, "gaussian_blur", 3)
    assert (fixed.severity == 3).all() and (fixed.degradation == "gaussian_blur").all()


def test_crosslab_tables(manifests):
    table = B.make_crosslab(manifests)
    assert set(table.label) == set(B.CROSSLAB_CLASSES) and set(table.lab) == set(B.LABS)
    val_share = (table.part == "val").groupby([table.lab, table.label]).mean()
    assert val_share.between(0.1, 0.3).all()
    split = B.crosslab_split(table, ["zheng1", "bccd"], ["pbc"], train_per_class=20)
    assert set(split[split.split != "test"].lab) == {"pbc"}
    assert set(split[split.split == "test"].lab) == {"zheng1", "bccd"}
    assert (split[split.split == "train"].label.value_counts() == 20).all()
    assert len(split[split.split == "test"]) == len(table[table.lab.isin(["zheng1", "bccd"])])
    lolo = B.crosslab_split(table, ["zheng1"])
    assert set(lolo[lolo.split == "train"].lab) == {"pbc", "bccd"}


def test_written_files_are_reproducible(root, tmp_path):
    first = B.write_benchmarks(tmp_path / "a", root=root, seed=0)
    second = B.write_benchmarks(tmp_path / "b", root=root, seed=0)
    for key in first:
        assert filecmp.cmp(first[key], second[key], shallow=False), key
    table, definition = B.read_pbc_lt(tmp_path / "a")
    assert definition.seed == 0 and len(table) > 12000
