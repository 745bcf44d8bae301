import math

import pytest

from pipeline.serve.events import InvalidEvent, validate
from pipeline.settings import LimitSettings
from tests.pipeline.sample import NOW_MS, click_record

LIMITS = LimitSettings(max_string_length=64, max_candidates=3)


def check(record, key=b"u1"):
    validate(record, key, LIMITS, NOW_MS)


def test_valid_event_passes():
    check(click_record())


@pytest.mark.parametrize(
    ("changes", "key", "kind"),
    [
        ({}, None, "validate.key_missing"),
        ({}, b"", "validate.key_missing"),
        ({}, b"someone-else", "validate.key_mismatch"),
        ({"event_id": ""}, b"u1", "validate.event_id_empty"),
        ({"price": math.nan}, b"u1", "validate.price_not_finite"),
        ({"price": math.inf}, b"u1", "validate.price_not_finite"),
        ({"price": -1.0}, b"u1", "validate.price_negative"),
        ({"payment_amount": 1e12}, b"u1", "validate.payment_amount_too_large"),
        ({"quantity": 0}, b"u1", "validate.quantity_out_of_range"),
        ({"quantity": 10**6}, b"u1", "validate.quantity_out_of_range"),
        ({"event_time": NOW_MS + 10**9}, b"u1", "validate.event_time_future"),
        ({"event_time": 0}, b"u1", "validate.event_time_too_old"),
        ({"user_agent": "x" * 65}, b"u1", "validate.string_too_long"),
        ({"candidates": [1, 2, 3, 4]}, b"u1", "validate.too_many_candidates"),
    ],
)
def test_each_rule_has_a_specific_reason(changes, key, kind):
    with pytest.raises(InvalidEvent) as error:
        check(click_record(**changes), key)
    assert error.value.kind == kind


def test_unknown_ids_are_valid():
    check(click_record(item_id=10**12, candidates=[10**12, -5]))
