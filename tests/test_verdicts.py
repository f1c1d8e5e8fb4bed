"""The verdict rules the chapters print beside their numbers."""
from wbclib import verdicts


def test_interval_needs_the_whole_interval_on_one_side():
    assert verdicts.interval(0.02, 0.001, 0.04).startswith("better, +2.0 [+0.1, +4.0]")
    assert verdicts.interval(-0.02, -0.04, -0.001).startswith("worse")
    assert verdicts.interval(0.02, -0.001, 0.04).startswith("not distinguishable")


def test_consistency_asks_for_a_mean_beyond_one_spread():
    assert verdicts.consistency(1.0, 0.5) == "helps"
    assert verdicts.consistency(-1.0, 0.5) == "hurts"
    assert verdicts.consistency(0.4, 0.5) == "makes no consistent difference"


def test_reproduction_needs_significance_and_half_the_papers_gain():
    assert verdicts.reproduction(gain=2.0, low=0.5, paper_gain=3.0) == "reproduced"
    assert verdicts.reproduction(gain=1.0, low=0.5, paper_gain=3.0).startswith("same direction")
    assert verdicts.reproduction(gain=2.0, low=-0.5, paper_gain=3.0).startswith("same direction")
    assert verdicts.reproduction(gain=0.0, low=-0.5, paper_gain=3.0) == "not reproduced"


def test_views_carry_gain_within_tolerance_or_above():
    assert verdicts.views_carry_gain(60.0, 61.0)  # one point short: still carries it
    assert verdicts.views_carry_gain(62.0, 61.0)
    assert not verdicts.views_carry_gain(59.9, 61.0)
    assert not verdicts.views_carry_gain(60.5, 61.0, tolerance=0.4)
