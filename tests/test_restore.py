"""Restoration: median / bilateral filters, PSNR / SSIM, the noise detector on
real pbc images, synthetic pairs from the benchmark's degradations, the
Pix2Pix networks and their resumable training, and the restoring loader."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from conftest import write_png
from wbclib import degrade as D
from wbclib import pix2pix as P2P
from wbclib import restore as R
from wbclib.protocols import restoration as protocol
from wbclib.data import load_image
from wbclib.models import ImageTable

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def texture():
    """A smooth stained-looking RGB texture (64 x 64)."""
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([170 + 50 * np.sin(xx / 6), 120 + 60 * np.cos(yy / 8), 190 + 30 * np.sin((xx + yy) / 9)], -1)
    return np.clip(base, 0, 255).astype(np.uint8)


def test_median3x3_equals_scipy():
    rng = np.random.default_rng(0)
    for shape in [(5, 7, 3), (33, 20, 3), (12, 9)]:
        image = rng.integers(0, 256, shape).astype(np.uint8)
        size = (3, 3, 1)[: image.ndim]
        assert np.array_equal(R.median3x3(image), ndimage.median_filter(image, size=size, mode="mirror"))


def test_psnr_ssim_of_identical_and_degraded_images(texture):
    assert R.psnr(texture, texture) == float("inf")
    assert R.ssim(texture, texture) == pytest.approx(1.0)
    noisy = D.gaussian_noise(texture, 10, np.random.default_rng(0))
    assert 20 < R.psnr(texture, noisy) < 35
    assert R.ssim(texture, noisy) < 0.95


def test_median_and_bilateral_restore_noise(texture):
    sp = D.salt_and_pepper(texture, 0.05, np.random.default_rng(0))
    assert R.psnr(texture, R.median3x3(sp)) > R.psnr(texture, sp) + 10
    gn = D.gaussian_noise(texture, 15, np.random.default_rng(1))
    assert R.psnr(texture, R.bilateral(gn)) > R.psnr(texture, gn) + 2
    flat = np.full((9, 11, 3), 77, np.uint8)
    assert np.array_equal(R.bilateral(flat), flat)


def _pbc_images(root: Path, n: int):
    files = sorted((root / "pbc").glob("*/*.jpg"))[:: max(1, len(list((root / "pbc").glob("*/*.jpg"))) // (2 * n))]
    return [load_image(f) for f in files[: 2 * n]]


def test_detector_separates_clean_from_5pct_salt_and_pepper_on_pbc(root):
    images = _pbc_images(root, 12)
    rng = np.random.default_rng(0)
    clean = [R.noise_scores(im) for im in images[:12]]
    noisy = [R.noise_scores(D.salt_and_pepper(im, 0.05, rng)) for im in images[12:]]
    truth = np.r_[np.zeros(len(clean), bool), np.ones(len(noisy), bool)]
    for score in R.SCORES:
        values = [s[score] for s in clean + noisy]
        detector = R.NoiseDetector.fit(values, score=score)
        assert detector.components >= 2
        assert np.array_equal(detector.predict(values), truth), score
        assert detector.is_noisy(D.salt_and_pepper(images[0], 0.05, rng)) and not detector.is_noisy(images[0])
    # A clean-only set has no second population: nothing is flagged.
    only_clean = R.NoiseDetector.fit([s["impulse"] for s in clean], score="impulse")
    assert not only_clean.predict([s["impulse"] for s in clean]).any()


def test_detection_scores_counts():
    out = R.detection_scores([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)


def test_make_pairs_uses_the_benchmark_degradations(texture):
    images = [texture, texture[::-1].copy()]
    noisy, meta = R.make_pairs(images, ["salt_pepper"], np.random.default_rng(3))
    assert np.array_equal(images[0], texture)  # inputs untouched
    rng = np.random.default_rng(3)
    rng.integers(1)
    param = rng.uniform(*R.PAIR_RANGES["salt_pepper"])
    assert meta.loc[0, "param"] == pytest.approx(param)
    assert np.array_equal(noisy[0], D.salt_and_pepper(texture, param, rng))
    lo, hi = R.PAIR_RANGES["salt_pepper"]
    assert meta["param"].between(lo, hi).all() and (meta["kind"] == "salt_pepper").all()
    blurred, meta = R.make_pairs(images, ["gaussian_blur"], np.random.default_rng(0))
    assert np.array_equal(blurred[0], D.gaussian_blur(texture, meta.loc[0, "param"] * 64))
    with pytest.raises(ValueError, match="kinds must be among"):
        R.make_pairs(images, ["fog"], np.random.default_rng(0))


def test_networks_shapes_and_whole_image_restorer():
    g = P2P.UNetGenerator(channels=4, depth=3)
    assert g(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    d = P2P.PatchDiscriminator(channels=4, layers=3)
    assert P2P.PatchDiscriminator.receptive_field(3) == 70
    assert d(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    image = np.random.default_rng(0).integers(0, 256, (37, 45, 3)).astype(np.uint8)
    out = P2P.Pix2PixRestorer(g)(image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_pix2pix_steps_bring_the_output_closer_to_the_clean_target(texture):
    torch.manual_seed(0)
    model = P2P.Pix2Pix(P2P.Pix2PixConfig(channels=8, depth=3, d_channels=8, d_layers=1, lr=2e-3))
    rng = np.random.default_rng(0)
    crops = [texture[:32, :32], texture[32:, 32:], texture[:32, 32:], texture[32:, :32]]
    clean = torch.stack([P2P.to_tensor(c) for c in crops])
    noisy = torch.stack([P2P.to_tensor(D.salt_and_pepper(c, 0.08, rng)) for c in crops])

    def l1():
        model.generator.eval()
        with torch.no_grad():
            out = (model.generator(noisy).clamp(-1, 1) - clean).abs().mean().item()
        model.generator.train()
        return out

    before, input_l1 = l1(), (noisy - clean).abs().mean().item()
    for _ in range(100):
        model.step(noisy, clean)
    after = l1()
    assert after < 0.5 * before and after < input_l1


def test_pix2pix_run_resumes_to_the_same_weights(synthetic_root, tmp_path, monkeypatch):
    paths = sorted(str(p.relative_to(synthetic_root)) for p in synthetic_root.glob("*/*.png"))[:8]
    table = pd.DataFrame({"path": paths})
    config = P2P.Pix2PixConfig(crop=16, epochs=2, batch_size=4, channels=4, depth=2, d_channels=4, d_layers=1)
    device = torch.device("cpu")
    straight = P2P.train_pix2pix(config, table, synthetic_root, tmp_path / "a", device=device)

    calls = {"n": 0}
    step = P2P.Pix2Pix.step

    def interrupted(self, noisy, clean):
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return step(self, noisy, clean)

    monkeypatch.setattr(P2P.Pix2Pix, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P2P.train_pix2pix(config, table, synthetic_root, tmp_path / "b", device=device)
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "generator.pt").exists()
    monkeypatch.setattr(P2P.Pix2Pix, "step", step)
    resumed = P2P.train_pix2pix(config, table, synthetic_root, tmp_path / "b", device=device)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(pd.read_csv(tmp_path / "b" / "history.csv")) == 2
    # A finished run is loaded, not retrained; another configuration is refused.
    monkeypatch.setattr(P2P.Pix2Pix, "step", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    P2P.train_pix2pix(config, table, synthetic_root, tmp_path / "b", device=device)
    from wbclib.train import RunMismatch

    with pytest.raises(RunMismatch):
        P2P.train_pix2pix(P2P.Pix2PixConfig(crop=16, epochs=3), table, synthetic_root, tmp_path / "b", device=device)


def test_restored_table_matches_image_table_and_restores_flagged_rows(synthetic_root):
    paths = sorted(str(p.relative_to(synthetic_root)) for p in synthetic_root.glob("*/*.png"))[:4]
    table = pd.DataFrame({"path": paths, "label": [Path(p).parent.name for p in paths],
                          "degradation": "salt_pepper", "severity": 3})
    classes = ["lymphocyte", "neutrophil"]
    plain = ImageTable(table, synthetic_root, classes, 24)
    same = R.RestoredImageTable(table, synthetic_root, classes, 24)
    for i in range(len(table)):
        assert torch.equal(plain[i][0], same[i][0])
    flags = [True, False, True, False]
    restored = R.RestoredImageTable(table, synthetic_root, classes, 24, flags=flags, restorer=R.median3x3)
    for i, flag in enumerate(flags):
        assert torch.equal(plain[i][0], restored[i][0]) != flag
    with pytest.raises(ValueError, match="need a restorer"):
        R.RestoredImageTable(table, synthetic_root, classes, 24, flags=flags)


def test_noise_rate_sets_hold_each_image_once(synthetic_root):
    paths = sorted(str(p.relative_to(synthetic_root)) for p in synthetic_root.glob("*/*.png"))[:10]
    versions = R.detector_versions(pd.DataFrame({"path": paths}), synthetic_root)
    assert len(versions) == 10 * 2 * 3
    s = R.noise_rate_set(versions, "pristine", "salt_pepper", 0.3)
    assert sorted(s["image"]) == list(range(10)) and s["noisy"].sum() == 3
    assert set(s.loc[s["noisy"], "version"]) == {"salt_pepper"}


def test_chapter_folder_follows_settings_and_images(tmp_path, synthetic_root):
    from wbclib import profiles

    images = dict(pool=pd.DataFrame({"path": ["lymphocyte/lymphocyte_0.png"], "label": ["lymphocyte"]}))
    cfg = profiles.get("smoke")
    first = protocol.chapter_run(tmp_path, cfg, synthetic_root, images, seed=0)
    assert protocol.chapter_run(tmp_path, cfg, synthetic_root, images, seed=0).dir == first.dir
    assert protocol.chapter_run(tmp_path, profiles.get("cpu"), synthetic_root, images, seed=0).dir != first.dir
    write_png(synthetic_root / "lymphocyte" / "lymphocyte_0.png", np.zeros((40, 40, 3), np.uint8))  # image replaced
    assert protocol.chapter_run(tmp_path, cfg, synthetic_root, images, seed=0).dir != first.dir


def test_macro_f1_by_kind_puts_severity_0_rows_under_none():
    """A phase-2 row keeps its drawn kind at severity 0 (pristine): it is
    scored with the pristine rows, not with its kind's degraded ones."""
    pred = pd.DataFrame(dict(label=["A", "B", "A", "B", "A"], pred=["A", "B", "B", "A", "A"],
                             degradation=["blur", "blur", "blur", "salt_pepper", "none"], severity=[0, 0, 2, 3, 0],
                             flagged=[False, False, True, True, False]))
    table = R.macro_f1_by_kind(pred, ["A", "B"], n_boot=0).set_index("kind")
    assert table["n"].to_dict() == {"all": 5, "blur": 1, "none": 3, "salt_pepper": 1}
    assert table.loc["none", "accuracy"] == 1.0 and table.loc["blur", "accuracy"] == 0.0
    assert table.loc["blur", "flagged"] == 1 and table.loc["none", "flagged"] == 0
    assert R.applied_kind(pred).tolist() == ["none", "none", "blur", "salt_pepper", "none"]
    assert R.is_degraded_by(pred, "blur").tolist() == [False, False, True, False, False]
