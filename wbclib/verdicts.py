"""The rules by which the book judges a measured effect, in one tested place.

Chapters print these verdicts beside the numbers; the rule, not the prose
around it, decides what "helps" or "reproduced" means.
"""
from __future__ import annotations


def interval(gain: float, low: float, high: float) -> str:
    """A paired difference with its 95 % interval (fractions): ``better`` only
    when the whole interval lies above zero, ``worse`` when it lies below,
    else ``not distinguishable``; followed by the span in points."""
    span = f"{100 * gain:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    if low > 0:
        return f"better, {span}"
    if high < 0:
        return f"worse, {span}"
    return f"not distinguishable, {span}"


def consistency(mean: float, std: float) -> str:
    """A mean difference over many paired runs with its spread: ``helps`` when
    the mean exceeds one standard deviation above zero, ``hurts`` when below,
    else ``makes no consistent difference``."""
    if mean - std > 0:
        return "helps"
    if mean + std < 0:
        return "hurts"
    return "makes no consistent difference"


def reproduction(gain: float, low: float, paper_gain: float) -> str:
    """A paper's gain re-measured (same units): ``reproduced`` when the
    interval excludes zero and the estimate is at least half the paper's;
    ``same direction, smaller or not significant`` when positive otherwise;
    ``not reproduced`` when zero or negative."""
    if low > 0 and gain >= paper_gain / 2:
        return "reproduced"
    if gain > 0:
        return "same direction, smaller or not significant"
    return "not reproduced"


def views_carry_gain(views_score: float, full_score: float, tolerance: float = 1.0) -> bool:
    """Whether a method's augmentation alone carries its result: the baseline
    trained on the same augmented views (``views_score``) comes within
    ``tolerance`` (same units, points by default) of the full method
    (``full_score``) or above it."""
    return views_score >= full_score - tolerance
