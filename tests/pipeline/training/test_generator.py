import collections
import time

import pytest

from pipeline.serve.events import validate
from pipeline.settings import (
    FeatureSettings,
    LimitSettings,
    ProduceSettings,
    SettingsError,
    load_settings,
)
from pipeline.tools.loadgen import LiveClock
from pipeline.training.generator import GeneratorConfig, generate

CONFIG = GeneratorConfig(events=20_000, users=300, seed=11)


def test_deterministic_for_a_seed():
    assert list(generate(CONFIG))[:500] == list(generate(CONFIG))[:500]
    other = GeneratorConfig(events=20_000, users=300, seed=12)
    assert list(generate(CONFIG))[:50] != list(generate(other))[:50]


def test_events_are_time_ordered_and_labels_stay_out_of_events():
    pairs = list(generate(CONFIG))
    times = [event["event_time"] for event, _ in pairs]
    assert times == sorted(times)
    assert all("is_fraud" not in event and "pattern" not in event for event, _ in pairs)
    assert all(event["event_id"] == label["event_id"] for event, label in pairs)


def test_every_fraud_pattern_and_behaviour_appears():
    pairs = list(generate(CONFIG))
    patterns = collections.Counter(label["pattern"] for _, label in pairs)
    assert {"card_testing", "account_takeover", "bot", ""} <= set(patterns)
    assert patterns[""] > 0.7 * len(pairs)
    types = collections.Counter(event["event_type"] for event, _ in pairs)
    assert types["product_view"] > types["add_to_cart"] > 0
    assert types["purchase"] > 0 and types["login"] > 0
    assert any(event["candidates"] for event, _ in pairs)


def test_the_reseller_pattern_starts_after_drift_after_and_changes_nothing_before():
    drifting = GeneratorConfig(
        events=20_000, users=300, seed=11, drift_after=8_000, reseller_rate=0.3
    )
    plain, drifted = list(generate(CONFIG)), list(generate(drifting))
    first = next(i for i, (_, label) in enumerate(drifted) if label["pattern"] == "reseller")
    assert first >= 8_000 and plain[:8_000] == drifted[:8_000]  # the same stream up to it
    resold = [(event, label) for event, label in drifted if label["pattern"] == "reseller"]
    assert len(resold) > 200 and all(label["is_fraud"] for _, label in resold)
    for event, _ in resold:  # bulk purchases on the user's own card, in their country
        assert event["event_type"] == "purchase" and event["quantity"] >= 8
        assert event["billing_country"] == event["country"]
    assert not any(label["pattern"] == "reseller" for _, label in plain)


def test_legitimate_purchases_follow_items_put_in_the_cart():
    carted: set[str] = set()
    purchases = 0
    for event, label in generate(CONFIG):
        if event["event_type"] == "add_to_cart":
            assert event["item_id"] is not None
            carted.add(event["user_id"])
        if event["event_type"] == "purchase" and not label["is_fraud"]:
            assert event["user_id"] in carted
            assert event["payment_amount"] > 0
            purchases += 1
    assert purchases > 0


def test_anchoring_ends_the_timeline_before_now():
    now_s = 2_000_000_000.0
    config = GeneratorConfig(events=5000, users=100).anchored_before(now_s)
    last = max(event["event_time"] for event, _ in generate(config))
    assert last <= now_s * 1000


@pytest.mark.parametrize(
    ("events", "users"),
    [(9_000, 50), (40_000, 20), (3_000, 300), (2_000, 1)],  # 180, 2000, 10 and 2000 per user
)
def test_a_backlog_ends_before_now_whatever_the_events_per_user(events, users):
    # A soak of 180 events per user once ran hours past the horizon: 9.5% of it was refused
    # as validate.event_time_future.
    now = time.time()
    config = GeneratorConfig(events=events, users=users, seed=5).anchored_before(now)
    pairs = list(generate(config))
    assert len(pairs) == events
    limits = LimitSettings()
    for event, _ in pairs:
        validate(event, event["user_id"].encode(), limits, int(now * 1000))  # raises if refused
    last = max(event["event_time"] for event, _ in pairs)
    assert config.start_ms <= min(event["event_time"] for event, _ in pairs)
    assert last <= config.start_ms + config.timeline_s * 1000 < now * 1000


def test_the_timeline_grows_only_when_the_sessions_per_user_need_it():
    assert GeneratorConfig(events=3_000, users=300).timeline_s == 24 * 3600.0
    assert GeneratorConfig(events=40_000, users=20).timeline_s > 24 * 3600.0 * 5


def test_a_live_clock_never_runs_ahead_and_sends_a_few_events_past_the_lateness_bound():
    settings = ProduceSettings(delay_mean_ms=150.0, late_fraction=0.01)
    clock = LiveClock(settings, seed=3)
    now_ms = 1_800_000_000_000
    delays = [(now_ms - clock.stamp(now_ms)) / 1000 for _ in range(20_000)]
    assert min(delays) >= 0
    late = [d for d in delays if d >= settings.late_min_s]
    assert 0.005 < len(late) / len(delays) < 0.015
    assert max(late) <= settings.late_max_s
    assert settings.late_min_s > FeatureSettings().allowed_lateness_s  # meets the late rule
    on_time = [d for d in delays if d < settings.late_min_s]
    assert 0.12 < sum(on_time) / len(on_time) < 0.18  # seconds: the mean delivery delay
    first, second = LiveClock(settings, seed=3), LiveClock(settings, seed=3)
    assert [first.stamp(now_ms) for _ in range(50)] == [second.stamp(now_ms) for _ in range(50)]


def test_late_bounds_out_of_order_are_refused_by_name():
    with pytest.raises(SettingsError, match="produce"):
        load_settings(produce={"late_min_s": 7200, "late_max_s": 3600})
