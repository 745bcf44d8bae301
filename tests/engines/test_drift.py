"""Drift profiles: the compiled histogram against its numpy oracle, PSI against its
formula, and the manifest round trip.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engines.drift import SCORE, SHARE_FLOOR, Profile

NAMES = ("amount", "flag", "kind")


def training(rng, n=2_000):
    numeric = np.column_stack(
        [rng.lognormal(3, 1, n), (rng.random(n) < 0.2).astype(np.float64)]
    ).astype(np.float32)
    categorical = rng.integers(0, 4, (n, 1))
    scores = rng.beta(0.5, 8, n)
    return numeric, categorical, scores


@pytest.fixture(scope="module")
def profile():
    numeric, categorical, scores = training(np.random.default_rng(3))
    return Profile.fit(NAMES[:2] + NAMES[2:], numeric, categorical, [4], scores)


def test_bins_follow_the_training_data(profile):
    assert profile.names == (*NAMES, SCORE)
    amount, flag, kind, score = profile.cuts
    assert len(amount) == 9 and len(score) == 9  # deciles of continuous values
    assert flag.tolist() == [0.0, 1.0]  # a flag's deciles merge into its two values
    assert kind.tolist() == [0.0, 1.0, 2.0]  # one bin per category
    sizes = [len(c) + 1 for c in profile.cuts]
    starts = np.cumsum([0, *sizes])
    for start, end in itertools.pairwise(starts):
        assert profile.expected[start:end].sum() == pytest.approx(1.0)
    assert profile.expected[starts[0] : starts[1]] == pytest.approx(
        [0.1] * 10, abs=0.002
    )  # deciles split the amounts evenly


def test_psi_is_zero_on_the_training_distribution_and_grows_with_a_shift(profile):
    rng = np.random.default_rng(4)
    numeric, categorical, scores = training(rng, 20_000)
    same = profile.psi(profile.histogram(numeric, categorical, scores))
    assert all(value < 0.01 for value in same.values()), same
    numeric[:, 0] *= 3  # amounts triple
    scores = rng.beta(2, 4, len(scores))  # scores move up
    shifted = profile.psi(profile.histogram(numeric, categorical, scores))
    assert shifted["amount"] > 0.2 and shifted[SCORE] > 0.2
    assert shifted["kind"] < 0.01 and shifted["flag"] < 0.01


def test_psi_matches_its_formula_and_is_nan_for_an_empty_column(profile):
    counts = np.zeros(profile.bins, dtype=np.int64)
    counts[0] = 3  # all of "amount" in its first bin
    counts[1] = 1
    psi = profile.psi(counts)
    a = np.maximum(np.array([0.75, 0.25] + [0.0] * 8), SHARE_FLOOR)
    e = np.maximum(profile.expected[:10], SHARE_FLOOR)
    assert psi["amount"] == pytest.approx(((a - e) * np.log(a / e)).sum())
    assert math.isnan(psi["flag"]) and math.isnan(psi[SCORE])


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 60).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float32, (n, 2), elements=finite),
            hnp.arrays(np.int64, (n, 1), elements=st.integers(-1, 5)),
            hnp.arrays(np.float64, n, elements=st.floats(0, 1)),
        )
    )
)
def test_compiled_histogram_equals_its_oracle(profile, batch):
    numeric, categorical, scores = batch
    # values on the cut points themselves, where an off-by-one would show
    numeric[: len(profile.cuts[0]), 0] = profile.cuts[0][: len(numeric)]
    expected = profile.histogram_reference(numeric, categorical, scores)
    assert np.array_equal(profile.histogram(numeric, categorical, scores), expected)
    assert expected.sum() == len(scores) * len(profile.names)


def test_a_profile_survives_its_manifest(profile):
    again = Profile.from_manifest({"drift": json.loads(json.dumps(profile.to_manifest()))})
    assert again is not None and again.names == profile.names
    assert all(np.array_equal(a, b) for a, b in zip(again.cuts, profile.cuts, strict=True))
    assert np.array_equal(again.expected, profile.expected)
    assert Profile.from_manifest({}) is None


def test_rows_that_do_not_line_up_are_refused_before_the_kernel_reads_them(profile):
    numeric, categorical, scores = training(np.random.default_rng(5), 10)
    with pytest.raises(ValueError, match="rows differ"):
        profile.histogram(numeric, categorical, scores[:5])
    with pytest.raises(ValueError, match="the profile bins 4 columns"):
        profile.histogram(numeric[:, :1], categorical, scores)
