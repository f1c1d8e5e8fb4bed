"""Samplers: per-class draw probabilities, seeding and the registry."""
import numpy as np
import pytest

from wbclib.samplers import IMAGE_WEIGHT_RULES, SAMPLERS, class_sampling_probabilities, make_sampler

COUNTS = np.array([500, 100, 20, 5])
LABELS = np.repeat(np.arange(4), COUNTS)

# Class probabilities worked out by hand from each sampler's per-image weight w(n_c):
# P(c) = n_c * w(n_c) / sum_k n_k * w(n_k).
EXPECTED = {
    "instance": COUNTS / 625,
    "class_balanced": np.full(4, 0.25),
    "sqrt": np.sqrt(COUNTS) / np.sqrt(COUNTS).sum(),
    "inverse_log": (COUNTS / np.log(1 + COUNTS)) / (COUNTS / np.log(1 + COUNTS)).sum(),
}


def test_every_registered_sampler_has_a_class_probability_rule():
    assert sorted(IMAGE_WEIGHT_RULES) == SAMPLERS.names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_sampling_probabilities(name):
    probs = class_sampling_probabilities(name, COUNTS)
    np.testing.assert_allclose(probs, EXPECTED[name], rtol=1e-12)


def test_sqrt_and_inverse_log_values():
    # Spelled out: sqrt(500), sqrt(100), sqrt(20), sqrt(5) = 22.361, 10, 4.472, 2.236 (sum 39.069).
    np.testing.assert_allclose(class_sampling_probabilities("sqrt", COUNTS), [0.5723, 0.2560, 0.1145, 0.0572], atol=1e-4)
    # 500/log 501, 100/log 101, 20/log 21, 5/log 6 = 80.43, 21.67, 6.57, 2.79 (sum 111.46).
    np.testing.assert_allclose(class_sampling_probabilities("inverse_log", COUNTS), [0.7216, 0.1944, 0.0589, 0.0250], atol=1e-4)


def test_empty_class_gets_probability_zero():
    np.testing.assert_allclose(class_sampling_probabilities("class_balanced", [4, 0, 1]), [0.5, 0.0, 0.5])


@pytest.mark.parametrize("name", ["class_balanced", "sqrt", "inverse_log"])
def test_sampled_class_histogram_matches_probabilities(name):
    draws = 200_000
    idx = np.fromiter(make_sampler(name, LABELS, num_samples=draws, seed=1), dtype=int)
    freq = np.bincount(LABELS[idx], minlength=4) / draws
    p = EXPECTED[name]
    # Five binomial standard errors: a spurious failure has probability ~1e-6.
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / draws))


def test_instance_sampler_visits_every_image_once():
    idx = list(make_sampler("instance", LABELS, seed=3))
    assert sorted(idx) == list(range(len(LABELS)))
    assert idx != list(range(len(LABELS)))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_default_num_samples_is_dataset_size(name):
    assert len(make_sampler(name, LABELS)) == len(LABELS)
    assert len(list(make_sampler(name, LABELS))) == len(LABELS)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_seeded_determinism(name):
    first = list(make_sampler(name, LABELS, seed=7))
    assert list(make_sampler(name, LABELS, seed=7)) == first
    assert list(make_sampler(name, LABELS, seed=8)) != first


def test_unknown_name_lists_registered_samplers():
    with pytest.raises(KeyError, match="class_balanced, instance, inverse_log, sqrt"):
        make_sampler("oversample", LABELS)
    with pytest.raises(KeyError, match="class_balanced, instance, inverse_log, sqrt"):
        class_sampling_probabilities("oversample", COUNTS)
