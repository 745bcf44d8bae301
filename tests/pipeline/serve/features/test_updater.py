import dataclasses

import numpy as np

from pipeline.serve.events import ClickEvent
from pipeline.serve.features import FeatureUpdater, compute_features
from pipeline.serve.spec import FRAUD_NUMERIC
from pipeline.serve.state import FeatureStore
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.training.generator import GeneratorConfig, generate
from tests.pipeline.sample import NOW_MS, click_record

PSEUDONYMS = Pseudonyms.ephemeral()  # one key for every updater, so restored state matches

COLUMN = {name: i for i, name in enumerate(FRAUD_NUMERIC)}


def event(seconds: float = 0, **changes) -> ClickEvent:
    return ClickEvent(**click_record(event_time=NOW_MS + int(seconds * 1000), **changes))


def features(*events: ClickEvent, gap_s: float = 1800):
    return FeatureUpdater(FeatureStore(history_length=5), PSEUDONYMS, gap_s).process(
        list(events), all_histories=True
    )


def column(batch, name):
    return batch.numeric[:, COLUMN[name]]


def test_session_restarts_after_inactivity_gap():
    batch = features(event(0), event(10), event(4000), gap_s=1800)
    assert np.allclose(np.expm1(column(batch, "session_events_log")), [1, 2, 1])


def test_velocity_counts_decay_with_the_window():
    batch = features(*(event(s) for s in (0, 1, 2)), event(3600))
    events_1m = np.expm1(column(batch, "events_1m_log"))
    assert np.allclose(events_1m[:3], [1, 2, 3], atol=0.1)
    assert events_1m[3] < 1.01  # the first three have decayed away in the 1-minute window


def test_out_of_order_event_adds_its_decayed_weight():
    in_order = features(event(0), event(30), event(60))
    shuffled = features(event(0), event(60), event(30))
    assert np.isclose(
        column(in_order, "events_1h_log")[-1], column(shuffled, "events_1h_log")[-1], atol=1e-3
    )


def test_novelty_flags_new_device_country_and_card():
    batch = features(
        event(0, card_fingerprint="c1"),
        event(5, card_fingerprint="c1"),
        event(10, device_id="d2", country="FR", card_fingerprint="c2"),
    )
    for name in ("new_device", "new_country", "new_card"):
        assert list(column(batch, name)) == [0.0, 0.0, 1.0], name
    assert column(batch, "distinct_devices_1h")[-1] == 2


def test_history_holds_previous_items_newest_last():
    batch = features(
        event(0, item_id=1, category_id=10), event(1, item_id=2, category_id=20), event(2)
    )
    assert list(batch.history_items[2]) == [-1, -1, -1, 1, 2]
    assert list(batch.history_categories[2]) == [-1, -1, -1, 10, 20]
    assert list(batch.history_items[0]) == [-1] * 5


def test_partitions_are_dropped_independently():
    store = FeatureStore(history_length=5)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    updater.process([event(0), dataclasses.replace(event(0, user_id="u2"), partition=1)])
    store.drop_partition(0)
    assert store.users() == 1


def test_reference_is_deterministic_and_batching_does_not_matter():
    events = [
        ClickEvent(**record) for record, _ in generate(GeneratorConfig(events=3000, users=50))
    ]
    whole = compute_features(events, 10, 1800)
    updater = FeatureUpdater(FeatureStore(10), PSEUDONYMS, 1800)
    parts = [updater.process(events[i : i + 97]) for i in range(0, len(events), 97)]
    assert np.array_equal(whole.numeric, np.concatenate([p.numeric for p in parts]))
    assert np.array_equal(whole.numeric, compute_features(events, 10, 1800).numeric)


def test_category_affinity_is_the_share_of_decayed_category_interest():
    batch = features(
        event(0, event_type="product_view", category_id=10),
        event(1, event_type="product_view", category_id=10),
        event(2, event_type="product_view", category_id=20),
        event(3, event_type="product_view", category_id=10),
        event(4, event_type="search", category_id=30),
    )
    assert np.allclose(column(batch, "category_affinity"), [0, 1, 0, 2 / 3, 0], atol=1e-3)
    a_day_later = features(
        event(0, event_type="add_to_cart", category_id=10),  # weight 3
        event(86_400, event_type="product_view", category_id=20),  # 3/e of 10 remains
        event(86_401, event_type="product_view", category_id=10),
    )
    share = 3 / np.e / (3 / np.e + 1)
    assert np.isclose(column(a_day_later, "category_affinity")[-1], share, atol=1e-3)


def test_only_the_heaviest_categories_are_kept():
    views = [event(i, event_type="product_view", category_id=100 + i) for i in range(6)]
    heavy = [event(10 + i, event_type="purchase", category_id=100) for i in range(3)]
    newcomer = event(20, event_type="product_view", category_id=999)
    again = event(21, event_type="product_view", category_id=999)
    batch = features(*views, *heavy, newcomer, again)
    # 999 took the lightest slot and kept it; 100 (three purchases) was never displaced
    assert column(batch, "category_affinity")[-1] > 0
    check = features(
        *views, *heavy, newcomer, event(22, event_type="product_view", category_id=100)
    )
    assert column(check, "category_affinity")[-1] > 0.5
