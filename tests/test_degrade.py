import numpy as np
import pytest

from wbclib import degrade


@pytest.fixture
def image():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:128, 0:128]
    base = np.stack([128 + 60 * np.sin(xx / 5), 128 + 60 * np.cos(yy / 7), 150 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", degrade.KINDS)
def test_severity_orders_the_damage(image, kind):
    errors = []
    for level in degrade.SEVERITIES:
        out = degrade.degrade(image, kind, level, degrade.image_rng("img", 0))
        assert out.shape == image.shape and out.dtype == np.uint8
        errors.append(np.abs(out.astype(float) - image).mean())
    assert errors[0] > 0
    if kind != "illumination":  # a random colour cast is not monotone image by image
        assert errors == sorted(errors)


def test_same_key_same_degradation_other_key_differs(image):
    a = degrade.degrade(image, "salt_pepper", 3, degrade.image_rng("cell_1.jpg", 0))
    b = degrade.degrade(image, "salt_pepper", 3, degrade.image_rng("cell_1.jpg", 0))
    c = degrade.degrade(image, "salt_pepper", 3, degrade.image_rng("cell_2.jpg", 0))
    assert (a == b).all() and (a != c).any()


def test_salt_and_pepper_density(image):
    out = degrade.salt_and_pepper(image, 0.1, np.random.default_rng(0))
    hit = ((out == 0) | (out == 255)).all(-1) & ~((image == 0) | (image == 255)).all(-1)
    assert abs(hit.mean() - 0.1) < 0.02


def test_assignment_is_deterministic_and_balanced():
    keys = [f"img_{i}" for i in range(3000)]
    kinds, levels = degrade.assign_degradations(keys, seed=0)
    assert (kinds, levels) == degrade.assign_degradations(keys, seed=0)
    assert set(kinds) == set(degrade.KINDS) and set(levels) == set(degrade.SEVERITIES)
    share = np.bincount([degrade.KINDS.index(k) for k in kinds]) / len(keys)
    assert np.all(np.abs(share - 1 / 3) < 0.04)


def test_bad_input_is_rejected(image):
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade.degrade(image, "fog", 1, degrade.image_rng("x", 0))
    with pytest.raises(ValueError, match="RGB uint8"):
        degrade.gaussian_blur(image.astype(np.float32), 1.0)


@pytest.mark.parametrize("severity", [1, 2, 3, 4])
def test_blur_matches_scipys_gaussian_filter(image, severity):
    # The reference: scipy's Gaussian filter, the implementation the benchmark was defined with.
    from scipy import ndimage

    sigma = degrade.SEVERITY_PARAMS["gaussian_blur"][severity] * min(image.shape[:2])
    reference = np.clip(np.rint(ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))), 0, 255)
    ours = degrade.gaussian_blur(image, sigma).astype(int)
    assert np.abs(ours - reference).max() <= 1
    assert (ours != reference).mean() < 1e-3


def test_illumination_shift_matches_the_float64_formula(image):
    # The formula in float64 (what the module computed before it kept float32 throughout).
    rng = np.random.default_rng(7)
    img = image.astype(np.float64) / 255.0
    h, w = image.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.cos(angle) * (xx / (w - 1) - 0.5) + np.sin(angle) * (yy / (h - 1) - 0.5)
    gains = 1.0 + 0.45 * rng.uniform(-0.5, 0.5, size=3)
    gamma = np.exp(0.45 * rng.uniform(-0.7, 0.7))
    reference = np.rint(np.clip(img * (1.0 + 0.45 * ramp[..., None]) * gains, 0, 1) ** gamma * 255)
    ours = degrade.illumination_shift(image, 0.45, np.random.default_rng(7)).astype(int)
    assert np.abs(ours - reference).max() <= 1
    assert (ours != reference).mean() < 1e-2
