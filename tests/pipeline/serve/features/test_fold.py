"""The features kernel and the user table against their oracle, FeatureUpdater and
FeatureStore, on random event streams: out-of-order and late events, replays after a
restore, TTL and max-users eviction, unknown and extreme ids, nulls, unicode, and empty and
long candidate lists.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from confluent_kafka import Message as KafkaMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipeline.serve import spec
from pipeline.serve.decode import OK, BatchDecoder
from pipeline.serve.events import ClickEvent
from pipeline.serve.features.fold import _CRC, Featurizer, crc32
from pipeline.serve.features.updater import FeatureUpdater
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.reference import FeatureStore, UserState
from pipeline.serve.state.table import UserTable
from pipeline.settings import LimitSettings
from schemas.codec import Encoder
from tests.pipeline.sample import NOW_MS, click_record
from tests.pipeline.serve.state.test_table import assert_memory_estimate

PSEUDONYMS = Pseudonyms.ephemeral()  # one key, shared by the oracle and the kernel

ENCODER = Encoder(schemas.CLICK_EVENT)
LIMITS = LimitSettings(max_event_age_s=10**9, max_future_skew_s=10**9)
HISTORY = 4
GAP_S = 1800.0
LATENESS_S = 3600.0


def Message(value: bytes, key: bytes, partition: int, offset: int) -> KafkaMessage:
    """A consumed message, as the consumer makes it (confluent-kafka's own constructor)."""
    return KafkaMessage(
        topic="clicks", partition=partition, offset=offset, key=key, value=value,
        timestamp=(1, NOW_MS),
    )  # fmt: skip


AGENTS = [
    "",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)",
    "Mozilla/5.0 (Windows NT 10.0)",
    "curl/8.0",
    "HeadlessChrome",
    "ÄNDROID tablet",
    "İpad x11",
    "Mozilla/5.0 (X11; Linux) Mobile",
    "robot",
]
EXTREME = st.sampled_from([0, 1, 7, 2**31 - 1, 2**31, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63)])
ids = st.none() | st.integers(0, 6) | EXTREME
event = st.fixed_dictionaries(
    {
        "user": st.sampled_from(["u1", "u2", "ü3", "u4"]),
        "partition": st.sampled_from([0, 1]),
        # seconds from the previous event: mostly forward, sometimes back, sometimes far
        "step_s": st.integers(-600, 600)
        | st.sampled_from([0, 0, -7200, -3601, -3600, 1801, 1800, 4000, 90_000]),
        "event_type": st.sampled_from(spec.EVENT_TYPES),
        "item_id": ids,
        "category_id": ids,
        "price": st.none() | st.sampled_from([0.0, -0.0, 9.99, 1e5]),
        "quantity": st.none() | st.integers(1, 5),
        "device_id": st.sampled_from(["", "d1", "d2", "dé"]) | st.integers(0, 40).map(str),
        "ip": st.sampled_from(["", "10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        "country": st.sampled_from(["", "DE", "FR", "ÜK"]),
        "user_agent": st.sampled_from(AGENTS),
        "payment_amount": st.none() | st.sampled_from([0.0, -0.0, 12.5, 999.0]),
        "payment_method": st.none() | st.sampled_from(spec.PAYMENT_METHODS),
        "card_fingerprint": st.none() | st.sampled_from(["c1", "c2", ""]),
        "billing_country": st.none() | st.sampled_from(["DE", "FR", ""]),
        "candidates": st.sampled_from([[], [1], [5, 6, 7]]) | st.lists(EXTREME, max_size=40),
    }
)


def stream(draws: list[dict]) -> list[tuple[dict, int, int]]:
    """Records with their partition and offset (increasing per partition)."""
    time_ms = NOW_MS
    offsets = {0: 0, 1: 0}
    out = []
    for i, draw in enumerate(draws):
        time_ms += draw["step_s"] * 1000
        record = click_record(
            event_id=f"e{i}",
            user_id=draw["user"],
            event_time=time_ms,
            **{k: v for k, v in draw.items() if k not in ("user", "partition", "step_s")},
        )
        partition = draw["partition"]
        out.append((record, partition, offsets[partition]))
        offsets[partition] += 1
    return out


NARROW = {
    "user": "u1",
    "device_id": "d1",
    "ip": "10.0.0.1",
    "country": "DE",
    "card_fingerprint": "c1",
}


class Pair:
    """The oracle and the kernel side by side, fed the same batches."""

    def __init__(
        self, max_users: int, ttl_s: float, all_histories: bool, history: int = HISTORY
    ) -> None:
        self.history = history
        self.store = FeatureStore(history, max_users, ttl_s)
        self.table = UserTable(history, max_users, ttl_s, capacity=2)  # grows while tested
        self.updater = FeatureUpdater(self.store, PSEUDONYMS, GAP_S, LATENESS_S)
        self.featurizer = Featurizer(self.table, PSEUDONYMS, GAP_S, LATENESS_S)
        self.decoder = BatchDecoder(LIMITS)
        self.all_histories = all_histories

    def run(self, batch: list[tuple[dict, int, int]]) -> None:
        events = [ClickEvent(**r, partition=p, offset=o) for r, p, o in batch]
        messages = [Message(ENCODER.encode(r), r["user_id"].encode(), p, o) for r, p, o in batch]
        columns, rejected = self.decoder.decode(messages, NOW_MS)
        assert not rejected and (columns.status == OK).all()
        rows = np.arange(len(batch), dtype=np.int64)
        fresh = self.updater.fresh(events)
        expected = self.updater.process(fresh, all_histories=self.all_histories)
        kept, got = self.featurizer.process(columns, rows, all_histories=self.all_histories)
        assert [events[i].event_id for i in kept.tolist()] == [e.event_id for e in fresh]
        np.testing.assert_array_equal(got.numeric, expected.numeric)
        np.testing.assert_array_equal(got.categorical, expected.categorical)
        np.testing.assert_array_equal(got.history_items, expected.history_items)
        np.testing.assert_array_equal(got.history_categories, expected.history_categories)
        assert self.featurizer.late == self.updater.late
        self.store.evict()
        self.table.evict()
        self.compare_changes()

    def compare_changes(self) -> None:
        want = {(c.partition, c.key.decode()): c.value for c in self.store.take_changes()}
        got = {(c.partition, c.key.decode()): c.value for c in self.table.take_changes()}
        assert got == want
        assert self.table.users() == self.store.users()
        assert self.table.evicted == self.store.evicted
        assert_memory_estimate(self.table)  # through folds, evictions and restores
        for partition in (0, 1):
            users = self.store._partitions.get(partition, {})
            assert [k.decode() for k in self.table.recency(partition)] == list(users)

    def restart(self) -> None:
        """Both sides restore from the oracle's full state, as after a crash."""
        records = []
        for partition in self.store.partitions():
            for user_id in list(self.store._partitions[partition]):
                state = self.store.peek(partition, user_id)
                assert state is not None
                records.append((partition, user_id, state.to_bytes()))
        self.store = FeatureStore(self.history, self.store.max_users, self.store._ttl_ms / 1000)
        self.table = UserTable(self.history, self.table.max_users, self.table._ttl_ms / 1000)
        for partition, user_id, value in records:
            self.store.restore(partition, user_id, value)
        self.table.restore(
            [p for p, _, _ in records],
            [u.encode() for _, u, _ in records],
            [v for *_, v in records],
        )
        late = self.updater.late
        self.updater = FeatureUpdater(self.store, PSEUDONYMS, GAP_S, LATENESS_S)
        self.featurizer = Featurizer(self.table, PSEUDONYMS, GAP_S, LATENESS_S)
        self.updater.late = self.featurizer.late = late


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    draws=st.lists(event, min_size=1, max_size=80),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    limits=st.sampled_from([(2**62, float("inf")), (2, float("inf")), (3, 7200.0), (2**62, 900.0)]),
    all_histories=st.booleans(),
    restart_at=st.none() | st.integers(0, 5),
    replay=st.integers(0, 10),
)
def test_kernel_equals_the_oracle(draws, cuts, limits, all_histories, restart_at, replay):
    run_pair(draws, cuts, limits, all_histories, restart_at, replay, HISTORY)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    draws=st.lists(event, min_size=20, max_size=80),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    limits=st.sampled_from([(2**62, float("inf")), (2, float("inf")), (2**62, 900.0)]),
    all_histories=st.booleans(),
    restart_at=st.none() | st.integers(0, 5),
    replay=st.integers(0, 10),
    narrow=st.booleans(),
)
def test_users_who_outgrow_their_slot_equal_the_oracle(
    draws, cuts, limits, all_histories, restart_at, replay, narrow
):
    """Long streams with 12 events of history, more than a slot holds inline (INLINE_EVENTS):
    users move to pool rows, by their seen values or, `narrow` (one user, one value per
    seen kind), by their items or history.
    """
    if narrow:
        draws = [d | NARROW for d in draws]
    run_pair(draws, cuts, limits, all_histories, restart_at, replay, 12)


def run_pair(draws, cuts, limits, all_histories, restart_at, replay, history):
    events = stream(draws)
    pair = Pair(*limits, all_histories, history)
    start = 0
    for n, size in enumerate(cuts * 10):
        if start >= len(events):
            break
        if n == restart_at:
            pair.restart()
            start = max(0, start - replay)  # re-read a stretch: the restored state has it
        pair.run(events[start : start + size])
        start += size


@pytest.mark.parametrize("step_s", [0, 1, -1])
def test_more_values_than_remembered_with_tied_times(step_s):
    """Seventeen devices in a row: the oldest (the first of them on a tie) is forgotten."""
    base = {
        "user": "u1", "partition": 0, "event_type": "login", "item_id": None,
        "category_id": None, "price": None, "quantity": None, "ip": "1", "country": "DE",
        "user_agent": "", "payment_amount": None, "payment_method": None,
        "card_fingerprint": None, "billing_country": None, "candidates": [],
    }  # fmt: skip
    draws = [base | {"step_s": step_s, "device_id": f"d{i}"} for i in range(20)]
    draws += [base | {"step_s": 0, "device_id": f"d{i}"} for i in range(20)]
    pair = Pair(2**62, float("inf"), all_histories=False)
    for record in stream(draws):
        pair.run([record])


def test_users_who_outgrow_their_slot_move_to_the_pool_and_give_the_row_back():
    """Twenty devices and items: the user moves to a pool row, states stay the oracle's,
    and eviction returns the row.
    """
    base = {
        "user": "u1", "partition": 0, "step_s": 10, "event_type": "product_view",
        "category_id": 3, "price": None, "quantity": None, "ip": "1", "country": "DE",
        "user_agent": "", "payment_amount": None, "payment_method": None,
        "card_fingerprint": None, "billing_country": None, "candidates": [1],
    }  # fmt: skip
    draws = [base | {"device_id": f"d{i}", "item_id": i} for i in range(20)]
    draws.append(base | {"user": "u2", "step_s": 90_000, "device_id": "d", "item_id": 1})
    pair = Pair(2**62, 3600.0, all_histories=True, history=12)
    records = stream(draws)
    pair.run(records[:10])
    assert pair.table.pool.used() == 2  # the scratch slot's row and u1's
    pair.run(records[10:20])
    pair.run(records[20:])  # a day later in u1's partition: u1 is evicted
    assert pair.table.users() == 1 and pair.table.pool.used() == 1


def test_a_session_of_more_items_than_a_slot_holds_moves_its_user_to_the_pool():
    """Ten distinct items in one session, one value per seen kind and a history that fits
    inline: the items alone outgrow the slot.
    """
    base = {
        "step_s": 10, "event_type": "product_view", "category_id": 3, "price": None,
        "quantity": None, "user_agent": "", "payment_amount": None, "payment_method": None,
        "billing_country": None, "candidates": [1],
    }  # fmt: skip
    draws = [base | NARROW | {"partition": 0, "item_id": i} for i in range(10)]
    pair = Pair(2**62, float("inf"), all_histories=True, history=HISTORY)
    for record in stream(draws):
        pair.run([record])
    assert pair.table.pool.used() == 2


def test_table_restores_the_oracles_bytes_and_writes_them_back():
    store = FeatureStore(HISTORY)
    updater = FeatureUpdater(store, PSEUDONYMS, GAP_S)
    events = [
        ClickEvent(**r, partition=p, offset=o)
        for r, p, o in stream(
            [
                {
                    "user": "u1",
                    "partition": 0,
                    "step_s": 30,
                    "event_type": "purchase",
                    "item_id": i,
                    "category_id": 2,
                    "price": 1.0,
                    "quantity": 1,
                    "device_id": f"d{i % 3}",
                    "ip": "1",
                    "country": "DE",
                    "user_agent": "",
                    "payment_amount": 3.0,
                    "payment_method": "card",
                    "card_fingerprint": "c",
                    "billing_country": None,
                    "candidates": [],
                }
                for i in range(9)
            ]
        )
    ]
    updater.process(events)
    value = UserState.to_bytes(store.peek(0, "u1"))  # type: ignore[arg-type]
    table = UserTable(HISTORY)
    table.restore([0], [b"u1"], [value])
    buffer, _ = table.encode(np.array([table.slot_of(0, b"u1")]))
    assert buffer.tobytes() == value
    table.restore([0], [b"u1"], [None])
    assert table.users() == 0 and table.slot_of(0, b"u1") == -1


def test_a_corrupt_changelog_record_is_refused():
    table = UserTable(HISTORY)
    with pytest.raises(ValueError, match="not a user state"):
        table.restore([0], [b"u1"], [b"\x07garbage"])


def test_crc32_is_zlibs():
    for text in [b"", b"DE", "ü".encode(), bytes(range(256))]:
        buf = np.frombuffer(text, dtype=np.uint8)
        assert crc32(buf, 0, len(buf), _CRC) == zlib.crc32(text)


def test_device_type_matches_the_reference():
    featurizer = Featurizer(UserTable(HISTORY), PSEUDONYMS, GAP_S)
    decoder = BatchDecoder(LIMITS)
    agents = [*AGENTS, "K\u212a bot", "IPHONE", "windows xp", "x1", "Python-Requests/2"]
    # Words cut short at the end, a word at the very end, one inside another, single bytes.
    agents += ["Mozilla (X11", "ipa", "bo", "b", "mobil", "tabletbot", "Ipad; CURL", "ccurl"]
    records = [click_record(user_agent=agent, event_id=f"e{i}") for i, agent in enumerate(agents)]
    messages = [Message(ENCODER.encode(r), b"u1", 0, i) for i, r in enumerate(records)]
    columns, _ = decoder.decode(messages, NOW_MS)
    _, batch = featurizer.process(columns, np.arange(len(agents), dtype=np.int64))
    assert batch.categorical[:, 1].tolist() == [spec.device_type_index(a) for a in agents]
