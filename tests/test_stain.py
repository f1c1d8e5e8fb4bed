"""Stain normalisation and augmentation on real smears (pbc, zheng1).

Macenko is checked against torchstain's torch backend, the reference
implementation it follows; Vahadane against properties of the factorisation
and its effect on a synthetic stain shift with known ground truth.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wbclib.data import DataError, data_root, load_image
from wbclib.stain import MacenkoNormalizer, StainAugmentor, VahadaneNormalizer, restain

PBC_SHAPE = (363, 360, 3)  # CellaVision crops; a few are 360x360 or 366x369


@pytest.fixture(scope="module")
def root():
    try:
        return data_root()
    except DataError as exc:
        pytest.skip(f"no data root: {exc}")


@pytest.fixture(scope="module")
def pbc_images(root):
    """The first image of each pbc class folder with the common shape
    (so they stack into a batch), target first: six different cell types."""
    images = []
    for group in sorted(p for p in (root / "pbc").iterdir() if p.is_dir()):
        for path in sorted(group.glob("*.jpg"))[:5]:
            image = load_image(path)
            if image.shape == PBC_SHAPE:
                images.append(image)
                break
    assert len(images) >= 4, "expected pbc class folders with 363x360 images"
    return images


@pytest.fixture(scope="module")
def zheng_images(root):
    """Three zheng1 images: another lab, a yellowish background and other stain."""
    paths = sorted((root / "zheng1" / "images").glob("*.png"))
    return [load_image(p) for p in paths[::80][:3]]


def stained_mask(image: np.ndarray) -> np.ndarray:
    """Pixels with OD >= 0.15 in every channel (all channels < 220): cells,
    not background, where a stain model is supposed to hold."""
    return image.max(-1) < 220


def colour_stats(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pixels = image[mask].astype(float)
    return np.concatenate([pixels.mean(0), pixels.std(0)])


def od_channel_shift(image: np.ndarray, gains=(1.3, 0.8, 1.15)) -> np.ndarray:
    """A synthetic stain shift: every stain's OD scaled per channel, i.e. the
    same concentrations under the stain matrix diag(gains) @ W."""
    od = np.log(256.0 / (image.astype(float) + 1)) * np.asarray(gains)
    return np.clip(np.round(256.0 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Macenko
# --------------------------------------------------------------------------


def test_macenko_agrees_with_torchstain(pbc_images, zheng_images):
    torchstain = pytest.importorskip("torchstain", reason="torchstain (dev extra) is the Macenko reference")

    def chw(image):
        return torch.from_numpy(image.copy()).permute(2, 0, 1)

    reference = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    reference.fit(chw(pbc_images[0]))
    ours = MacenkoNormalizer().fit(pbc_images[0])
    torch.testing.assert_close(ours.reference_stain_matrix, reference.HERef, atol=1e-3, rtol=0)
    # Concentrations come from a pseudo-inverse here and from lstsq there: their
    # 99th percentiles agree to ~6e-4 relative (measured), well inside 2e-3.
    torch.testing.assert_close(ours.reference_max_concentrations, reference.maxCRef, atol=0, rtol=2e-3)

    # Same float32 algorithm; only rounding differs (masked batched sums and
    # a pseudo-inverse where torchstain compacts pixels and calls lstsq), so
    # stain vectors agree to ~1e-4 and a pixel can land on the other side of
    # an integer in torchstain's truncation: 1 grey level at most, on a few
    # percent of pixels at worst (5% on the worst of 43 pbc images checked).
    for image in pbc_images[1:] + zheng_images:
        expected = reference.normalize(chw(image), stains=False)[0].numpy()
        difference = np.abs(ours.transform(image).astype(int) - expected)
        assert difference.max() <= 1
        assert difference.mean() < 0.1

    # Each image's own stain matrix, batched, against torchstain fitted per image.
    matrices = ours.stain_matrices(np.stack(pbc_images))
    for image, matrix in zip(pbc_images, matrices):
        per_image = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        per_image.fit(chw(image))
        torch.testing.assert_close(matrix, per_image.HERef, atol=1e-3, rtol=0)


def test_macenko_batch_matches_single_images_and_keeps_input_kind(pbc_images):
    normalizer = MacenkoNormalizer().fit(pbc_images[0])
    batch = np.stack(pbc_images[1:])
    singles = np.stack([normalizer.transform(image) for image in pbc_images[1:]])
    batched = normalizer.transform(batch)
    assert isinstance(batched, np.ndarray) and batched.dtype == np.uint8 and batched.shape == batch.shape
    # Batched matmuls may round differently from single ones: 1 grey level at most.
    assert np.abs(batched.astype(int) - singles).max() <= 1

    as_tensor = normalizer.transform(torch.from_numpy(batch))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.uint8
    assert np.array_equal(as_tensor.numpy(), batched)
    assert normalizer.stain_matrices(pbc_images[1]).shape == (1, 3, 2)
    assert normalizer.concentrations(batch).shape == (len(batch), *PBC_SHAPE[:2], 2)


# --------------------------------------------------------------------------
# Vahadane and restain
# --------------------------------------------------------------------------


def test_vahadane_stain_matrices_are_nonnegative_unit_and_hematoxylin_first(pbc_images, zheng_images):
    normalizer = VahadaneNormalizer()
    for images, count in ((np.stack(pbc_images), len(pbc_images)), (zheng_images[0], 1)):
        matrices = normalizer.stain_matrices(images)
        assert matrices.shape == (count, 3, 2)
        assert (matrices >= 0).all()
        torch.testing.assert_close(matrices.norm(dim=1), torch.ones(matrices.shape[0], 2))
        assert (matrices[:, 0, 0] >= matrices[:, 0, 1]).all(), "hematoxylin (more red OD) must come first"


def test_vahadane_factorisation_reconstructs_stained_od(pbc_images):
    normalizer = VahadaneNormalizer()
    batch = np.stack(pbc_images)
    od = torch.from_numpy(np.log(256.0 / (batch.astype(np.float32) + 1)))
    reconstruction = normalizer.concentrations(batch) @ normalizer.stain_matrices(batch).unsqueeze(1).mT
    error = (reconstruction - od).abs()
    for i, image in enumerate(pbc_images):
        mask = torch.from_numpy(stained_mask(image))
        # Cells have mean OD around 0.5; two stains explain them to a few percent.
        assert error[i][mask].mean() < 0.04
        assert (normalizer.concentrations(image) >= 0).all()


def test_vahadane_self_normalisation_changes_little(pbc_images):
    for image in pbc_images[:3]:
        normalized = VahadaneNormalizer().fit(image).transform(image)
        mask = stained_mask(image)
        # Unchanged scale and stains: only the lasso shrinkage and what two
        # stains cannot explain remain (a normalisation to another lab moves
        # cells by tens of grey levels).
        assert np.abs(normalized.astype(int) - image)[mask].mean() < 5


def test_vahadane_undoes_a_synthetic_stain_shift(pbc_images):
    target = pbc_images[1]
    shifted = od_channel_shift(target)
    normalizer = VahadaneNormalizer().fit(target)
    restored = normalizer.transform(shifted)
    mask = stained_mask(target)
    before = np.linalg.norm(colour_stats(shifted, mask) - colour_stats(target, mask))
    after = np.linalg.norm(colour_stats(restored, mask) - colour_stats(target, mask))
    assert after < 0.25 * before, (before, after)

    # Another image, shifted or not, lands on (nearly) the same normalised image.
    other = pbc_images[2]
    difference = np.abs(normalizer.transform(od_channel_shift(other)).astype(int) - normalizer.transform(other))
    assert difference.mean() < 0.5 * np.abs(od_channel_shift(other).astype(int) - other).mean()


def test_restain_is_the_vahadane_transform_and_takes_per_image_targets(pbc_images, zheng_images):
    normalizer = VahadaneNormalizer().fit(zheng_images[0])
    batch = np.stack(pbc_images[:3])
    source = normalizer.stain_matrices(batch)
    restained = restain(batch, source, normalizer.reference_stain_matrix, normalizer.reference_max_concentrations)
    assert np.array_equal(restained, normalizer.transform(batch))

    # SADA-style: every image gets its own target stains, here those of other images.
    targets, max_targets = normalizer.stain_statistics(np.stack(pbc_images[1:4]))
    fitted = VahadaneNormalizer().fit(pbc_images[1])
    torch.testing.assert_close(targets[0], fitted.reference_stain_matrix)
    torch.testing.assert_close(max_targets[0], fitted.reference_max_concentrations)
    per_image = restain(batch, source, targets, max_targets)
    for i in range(3):
        alone = restain(batch[i], source[i], targets[i], max_targets[i])
        assert np.abs(per_image[i].astype(int) - alone).max() <= 1

    with pytest.raises(ValueError, match="stain_matrices_tgt must have shape"):
        restain(batch, source, torch.ones(2, 3, 2), max_targets)
    with pytest.raises(ValueError, match="max_conc_tgt must have shape"):
        restain(batch, source, targets, torch.ones(3))


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_augmentor_is_seeded_and_changes_colours(pbc_images, method):
    batch = torch.from_numpy(np.stack(pbc_images[:3]))
    first = StainAugmentor(method=method, seed=7)(batch)
    assert isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.shape == batch.shape
    assert torch.equal(first, StainAugmentor(method=method, seed=7)(batch))
    assert not torch.equal(first, StainAugmentor(method=method, seed=8)(batch))

    augmentor = StainAugmentor(method=method, seed=7)
    augmentor(batch)
    assert not torch.equal(first, augmentor(batch)), "successive batches draw fresh jitter"
    change = (first.int() - batch.int()).abs().float().mean(dim=(1, 2, 3))
    assert (change > 2).all(), change


def test_augmentor_without_jitter_only_reconstructs(pbc_images):
    image = pbc_images[0]
    unchanged = StainAugmentor(sigma1=0, sigma2=0, method="vahadane", seed=0)(image)
    assert np.abs(unchanged.astype(int) - image)[stained_mask(image)].mean() < 5


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(pbc_images):
    image = pbc_images[0]
    normalizer = MacenkoNormalizer()
    with pytest.raises(ValueError, match="before fit"):
        normalizer.transform(image)
    with pytest.raises(ValueError, match="one target image"):
        normalizer.fit(np.stack([image, image]))
    normalizer.fit(image)
    with pytest.raises(ValueError, match="uint8"):
        normalizer.transform(image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="uint8"):
        normalizer.transform(torch.from_numpy(image).float())
    with pytest.raises(ValueError, match="grayscale"):
        normalizer.transform(image[..., 0])
    with pytest.raises(ValueError, match="grayscale"):
        normalizer.transform(image[..., :1])
    with pytest.raises(ValueError, match="channels-first"):
        normalizer.transform(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        normalizer.transform(image.tolist())
    with pytest.raises(ValueError, match="fewer than 2 stained pixels"):
        normalizer.transform(np.stack([image, np.full_like(image, 255)]))
    with pytest.raises(ValueError, match="unknown stain method"):
        StainAugmentor(method="reinhard")
    with pytest.raises(ValueError, match="alpha"):
        MacenkoNormalizer(alpha=60)


# --------------------------------------------------------------------------
# The CPU path (numpy + OpenCV, one image at a time) against the batched torch path
# --------------------------------------------------------------------------


def test_macenko_cpu_path_matches_the_batched_torch_path(pbc_images, zheng_images):
    from wbclib.stain import _StainNormalizer

    normalizer = MacenkoNormalizer().fit(pbc_images[0])
    for images in (np.stack(pbc_images[1:]), *zheng_images):
        cpu = normalizer.transform(images)
        batched = _StainNormalizer.transform(normalizer, images)  # the path accelerators take
        # Same algorithm in float32; sums, exp and the truncation to integers
        # may round apart: 1 grey level at most, on about 1% of values (1.2%
        # measured on the pbc batch).
        difference = np.abs(cpu.astype(int) - batched)
        assert difference.max() <= 1
        assert difference.mean() < 0.03


def test_order_statistic_is_exact_with_ties_masks_and_small_inputs():
    from wbclib.stain import _nearest_rank, _order_statistic

    rng = np.random.default_rng(0)
    for n, q in [(130_000, 1), (130_000, 99), (130_000, 50), (50, 1), (1, 99), (20_000, 0)]:
        values = rng.normal(size=n).astype(np.float32)
        values[: n // 3] = values[0]  # many ties
        mask = rng.random(n) < 0.4
        mask[0] = True
        for m in (None, mask):
            chosen = np.sort(values if m is None else values[m])
            rank = _nearest_rank(len(chosen), q)
            assert _order_statistic(values, rank, m, len(chosen)) == chosen[rank]
