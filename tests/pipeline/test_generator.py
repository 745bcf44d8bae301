import collections

from pipeline.generator import GeneratorConfig, generate

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
