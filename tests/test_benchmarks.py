import filecmp

import numpy as np
import pytest

from wbclib import benchmarks as B
from wbclib import data
from wbclib.degrade import PHASE2_MIXES


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
    available = table[table.split == "cv"].label.value_counts()
    assert [available[c] for c in definition.head_order] == sorted(available, reverse=True)  # head = biggest class


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
    limited = B.long_tail_counts(list("abc"), 50, 1, available=dict(a=80, b=30, c=60))
    assert limited == dict(a=50, b=30, c=50)


def test_head_keeps_its_images_and_rho_sets_the_tail(pbc_lt):
    table, definition = pbc_lt
    pool = table[(table.split == "cv") & (table.fold != 0)].label.value_counts()
    head, c = definition.head_order[0], len(definition.head_order)
    for rho in B.RHOS:
        counts = B.train_counts(table, definition, rho, 0)
        assert counts[head] == pool[head]  # uncapped head: every training image of the biggest class
        for i, cls in enumerate(definition.head_order):
            assert counts[cls] == min(pool[cls], round(pool[head] * rho ** (-i / (c - 1))))
        split = B.pbc_lt_split(table, definition, rho, 0)
        assert split[split.split == "train"].label.value_counts().to_dict() == counts
    tail = B.train_counts(table, definition, 100, 0)[definition.head_order[-1]]
    assert 10 <= tail <= 25 and pool[head] > 1500
    rho1 = B.train_counts(table, definition, 1, 0)
    assert rho1 == pool.to_dict()  # rho 1: the natural class mix


def test_cpu_profile_cap_keeps_ten_tail_images(pbc_lt):
    from wbclib import profiles
    table, definition = pbc_lt
    n_max = profiles.get("cpu").n_max
    counts = B.train_count_table(table, definition, B.RHOS, 0, n_max)
    assert counts.loc[definition.head_order[0], "rho=100"] == n_max
    assert counts.loc[definition.head_order[-1], "rho=100"] >= 10
    assert counts.loc["total", "rho=1"] == sum(counts.loc[definition.head_order, "rho=1"])


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


def _assert_mix(rows, mix, tol):
    shares = B.severity_shares(rows)
    for level, expected in mix.shares().items():
        assert abs(shares[level] - expected) < tol, (level, shares[level], expected)


def test_phase2_and_severity_switches(pbc_lt):
    table, definition = pbc_lt
    split = B.pbc_lt_split(table, definition, 1, 0)
    assert (split.severity == 0).all()  # pristine unless switched on
    test = split.query("split == 'test'")
    stressed = B.stress(test)
    assert stressed.severity.between(1, 4).all() and set(stressed.degradation) <= {"salt_pepper", "gaussian_blur", "illumination"}
    _assert_mix(stressed, PHASE2_MIXES["stress"], 0.03)
    fixed = B.at_severity(test, "gaussian_blur", 3)
    assert (fixed.severity == 3).all() and (fixed.degradation == "gaussian_blur").all()


def test_phase2_gives_each_split_its_own_mix(pbc_lt):
    table, definition = pbc_lt
    split = B.pbc_lt_split(table, definition, 1, 0, phase2_train=True)
    train, val, test = (split[split.split == s] for s in ("train", "val", "test"))
    assert len(train) > 7000 and len(test) > 2500
    _assert_mix(train, PHASE2_MIXES["train"], 0.02)  # the headline setting: training degraded by its own mix
    # Selection happens on the phase-2 validation mix (the split's val rows), the test stays pristine here.
    assert (val.severity == val.val_severity).all() and (val.severity > 0).any()
    assert (test.severity == 0).all()
    val2, test2 = B.phase2(val), B.phase2(test)
    assert (val2.severity == val.severity).all()
    _assert_mix(val2, PHASE2_MIXES["val"], 0.04)
    _assert_mix(test2, PHASE2_MIXES["test"], 0.03)
    degraded_share = {n: (r.severity > 0).mean() for n, r in dict(train=train, val=val2, test=test2).items()}
    mean = {n: r.severity.mean() for n, r in dict(train=train, val=val2, test=test2).items()}
    assert degraded_share["train"] < degraded_share["val"] < degraded_share["test"] < 1
    assert mean["train"] < mean["val"] < mean["test"]
    harsh = lambda r: (r.severity >= 3).sum() / max(1, (r.severity > 0).sum())
    assert harsh(test2) > harsh(train) + 0.3  # among degraded images, test is shifted to harder severities
    assert (B.stress(test).severity > 0).all()  # the stress set: every image degraded
    assert (B.phase2(train).severity == train.severity).all()  # the switch is idempotent on training rows


def test_cv_images_have_a_draw_per_role(pbc_lt):
    table, definition = pbc_lt
    a = B.pbc_lt_split(table, definition, 1, 0, phase2_train=True)
    b = B.pbc_lt_split(table, definition, 1, 1, phase2_train=True)
    as_val = B.phase2(a[a.split == "val"]).set_index("path").severity  # fold 0 images serve as validation here
    as_train = b[b.split == "train"].set_index("path").severity  # ... and as training in fold 1
    both = as_val.index.intersection(as_train.index)
    assert len(both) > 1000
    assert (as_val[both] != as_train[both]).mean() > 0.3  # independent draws per role
    shared = a[a.split == "train"].set_index("path").severity.index.intersection(as_train.index)
    assert (a.set_index("path").severity[shared] == as_train[shared]).all()  # the same role, the same draw in every fold
    with pytest.raises(ValueError, match="no severity draw"):
        B.phase2(a.assign(split="elsewhere"))
    pool = B.phase2(table[table.split == "cv"])  # the raw cross-validation pool takes its training draw
    assert (pool.severity == pool.train_severity).all()


def test_phase2_draws_depend_on_seed_and_path_only(manifests, pbc_lt):
    table, _ = pbc_lt
    pbc = manifests[manifests.source == "pbc"]
    again, _ = B.make_pbc_lt(pbc.sample(frac=1.0, random_state=3), seed=0)  # another row order
    cols = ["path", "degradation", "phase2_severity", "train_severity", "val_severity", "test_severity"]
    assert again[cols].sort_values("path").reset_index(drop=True).equals(table[cols].sort_values("path").reset_index(drop=True))
    other, _ = B.make_pbc_lt(pbc, seed=1)
    assert (other.set_index("path").train_severity != table.set_index("path").train_severity).mean() > 0.2


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


def test_selection_rows_are_the_phase2_validation_mix(pbc_lt):
    from types import SimpleNamespace

    from wbclib.protocols.pbc_lt import pbc_lt_sets, selection_rows

    table, definition = pbc_lt
    cfg = SimpleNamespace(n_max=50, val_per_class=20, test_per_class=5, phase2_train=True)
    split, sets = pbc_lt_sets(cfg, table, definition, 10, 0)
    chosen = selection_rows(split)
    assert (sets["val"].severity == 0).all()  # the reported pristine validation set
    assert chosen.path.tolist() == sets["val_degraded"].path.tolist()
    assert (chosen.severity.to_numpy() == sets["val_degraded"].severity.to_numpy()).all()
    assert (chosen.severity > 0).any()
    pristine_split, _ = pbc_lt_sets(SimpleNamespace(**{**vars(cfg), "phase2_train": False}), table, definition, 10, 0)
    assert (selection_rows(pristine_split).severity == 0).all()  # the stress setting selects on pristine images
