"""Turns events into engine inputs while updating each user's state.

Velocity windows are exponentially decayed counters with the window as time constant: O(1)
memory per user and exact under out-of-order events, at the cost of soft window edges. An
event older than the user's latest adds its weight decayed to the latest time instead of 1.
Distinct counts keep each value's last-seen time and count those inside the window.

The late-event rule: an event more than `allowed_lateness_s` older than the newest event of
its user is late. It is scored from the user's current state, as any event is, but it does
not change that state. Within the bound, out-of-order events are folded in as above.

Replays: each state remembers the input offset of the last event folded into it. After a
restart under at-least-once, input from before that offset is already in the restored state
(the changelog is written only after the outputs of those events were acknowledged), so
`fresh` drops it instead of counting it twice.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence

import numpy as np

from pipeline.serve import spec
from pipeline.serve.events import PAYMENT_EVENTS, ClickEvent
from pipeline.serve.records import FeatureBatch
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.reference import (
    AFFINITY,
    AMOUNT_1H,
    COUNTER_TIME,
    EVENTS,
    FIRST_SEEN,
    LAST_LOGIN,
    LAST_PURCHASE,
    LAST_TIME,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
    NEVER,
    OFFSET,
    PURCHASES,
    SEEN_KINDS,
    SESSION_EVENTS,
    SESSION_LAST,
    SESSION_NOVELTY,
    SESSION_START,
    SESSION_VIEWS,
    WINDOWS,
    FeatureStore,
    UserState,
)

_LONG_AGO_S = 1e7  # stands in for "never" in since-last features
_HOUR_MS = 3_600_000
_DECAY_MS = [window * 1000.0 for window in spec.WINDOWS_S]
_AFFINITY_TAU_MS = spec.AFFINITY_TAU_S * 1000.0
_AFFINITY_EVENTS = {"product_view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
_LOG_COLUMNS = [i for i, name in enumerate(spec.FRAUD_NUMERIC) if name.endswith("_log")]
_INT32_MAX = 2**31 - 1
_WINDOW_NAMES = ("1m", "10m", "1h")  # spec.WINDOWS_S
_KIND_PLURALS = {"device": "devices", "ip": "ips", "country": "countries", "card": "cards"}


class FeatureUpdater:
    """Computes each event's features from the state before it, then folds it in."""

    def __init__(
        self,
        store: FeatureStore,
        pseudonyms: Pseudonyms,
        session_gap_s: float,
        allowed_lateness_s: float = float("inf"),
    ) -> None:
        """An updater over `store` that remembers values as `pseudonyms`; a gap over
        `session_gap_s` starts a new session, and an event over `allowed_lateness_s` behind
        its user's newest is late.
        """
        self.store = store
        self._pseudonym = pseudonyms.of
        self._gap_ms = session_gap_s * 1000.0
        self._lateness_ms = allowed_lateness_s * 1000.0
        self.late = 0

    def fresh(self, events: Sequence[ClickEvent]) -> list[ClickEvent]:
        """`events` without those already folded into their user's (restored) state."""
        store = self.store
        kept = []
        for event in events:
            state = store.peek(event.partition, event.user_id) if event.offset >= 0 else None
            if state is None or event.offset > state.ints[OFFSET]:
                kept.append(event)
        return kept

    def process(self, events: Sequence[ClickEvent], all_histories: bool = False) -> FeatureBatch:
        """Features for `events`, in order, updating state as it goes.

        Each row's item history is the user's sequence before its event; it is filled for
        events that carry candidates, or for every event when `all_histories` (training).
        """
        length = self.store.history_length
        numeric = np.zeros((len(events), len(spec.FRAUD_NUMERIC)), dtype=np.float32)
        categorical = np.zeros((len(events), len(spec.FRAUD_CATEGORICAL)), dtype=np.int64)
        hist_items = np.full((len(events), length), -1, dtype=np.int64)
        hist_cats = np.full((len(events), length), -1, dtype=np.int64)
        for row, event in enumerate(events):
            state = self.store.get(event.partition, event.user_id, event.event_time)
            if (all_histories or event.candidates) and state.history:
                pairs = np.frombuffer(state.history, dtype=np.int32).copy()  # no held export
                hist_items[row, length - len(pairs) // 2 :] = pairs[0::2]
                hist_cats[row, length - len(pairs) // 2 :] = pairs[1::2]
            ints = state.ints
            if ints[LAST_TIME] != NEVER and event.event_time < ints[LAST_TIME] - self._lateness_ms:
                self.late += 1
                numeric[row] = self._update(state.copy(), event)  # scored, state unchanged
            else:
                numeric[row] = self._update(state, event)
            if event.offset > ints[OFFSET]:
                ints[OFFSET] = event.offset
            categorical[row] = _categorical(event)
        log_columns(numeric)
        return FeatureBatch(numeric, categorical, hist_items, hist_cats)

    def _update(self, state: UserState, event: ClickEvent) -> list[float]:
        """The event's raw feature row, in `spec.FRAUD_NUMERIC` order, built by name
        (columns named *_log are logged per batch).
        """
        t = event.event_time
        ints, floats = state.ints, state.floats
        first = ints[LAST_TIME] == NEVER
        if first or t - ints[SESSION_LAST] > self._gap_ms:
            _new_session(state, t)
        values = (event.device_id, event.ip, event.country, event.card_fingerprint)
        hashes = [None if value is None else self._pseudonym(value) for value in values]
        novelty = [
            0.0 if first or h is None or h in seen[0::2] else 1.0
            for h, seen in zip(hashes, state.seen, strict=True)
        ]
        for i, flag in enumerate(novelty):
            if flag > floats[SESSION_NOVELTY + i]:
                floats[SESSION_NOVELTY + i] = flag
        payment = event.event_type in PAYMENT_EVENTS
        purchase = event.event_type == "purchase"
        amount = event.payment_amount or 0.0
        since_last = _since(t, ints[LAST_TIME])
        affinity = _affinity(floats, event.category_id)
        _fold(state, event, t, purchase, amount, values, hashes, self.store.history_length)
        billing = event.billing_country
        row: dict[str, float] = {
            "payment_amount_log": amount,
            "price_log": event.price or 0.0,
            "quantity_log": event.quantity or 0,
            "is_payment_event": float(payment),
            "first_event_of_user": float(first),
            "session_events_log": ints[SESSION_EVENTS],
            "session_duration_log": (ints[SESSION_LAST] - ints[SESSION_START]) / 1000.0,
            "session_distinct_items_log": len(state.session_items),
            "session_views_before_payment_log": ints[SESSION_VIEWS] if payment else 0,
            "since_last_event_log": since_last,
            "since_last_login_log": _since(t, ints[LAST_LOGIN]),
            "since_last_purchase_log": _since(t, ints[LAST_PURCHASE]),
            "user_age_log": (t - ints[FIRST_SEEN]) / 1000.0,
            "amount_1h_log": floats[AMOUNT_1H],
            "billing_country_mismatch": float(
                billing is not None and bool(event.country) and billing != event.country
            ),
            "category_affinity": affinity,
        }
        for i, window in enumerate(_WINDOW_NAMES):
            row[f"events_{window}_log"] = floats[EVENTS + i]
            row[f"purchases_{window}_log"] = floats[PURCHASES + i]
        for kind, name in enumerate(SEEN_KINDS):
            seen_times = state.seen[kind][1::2]
            distinct = sum(1 for seen_at in seen_times if t - seen_at <= _HOUR_MS)
            row[f"distinct_{_KIND_PLURALS[name]}_1h"] = float(distinct)
            row[f"new_{name}"] = novelty[kind]
            row[f"session_new_{name}"] = floats[SESSION_NOVELTY + kind]
        return [row[name] for name in spec.FRAUD_NUMERIC]


def log_columns(numeric: np.ndarray) -> None:
    """Take log1p of the *_log columns in place: one vectorised call per batch."""
    numeric[:, _LOG_COLUMNS] = np.log1p(np.maximum(numeric[:, _LOG_COLUMNS], 0.0))


def _new_session(state: UserState, t: int) -> None:
    ints = state.ints
    ints[SESSION_START] = t
    ints[SESSION_EVENTS] = 0
    ints[SESSION_VIEWS] = 0
    del state.session_items[:]
    for i in range(4):
        state.floats[SESSION_NOVELTY + i] = 0.0


def _fold(
    state: UserState,
    event: ClickEvent,
    t: int,
    purchase: bool,
    amount: float,
    values: tuple[str | None, ...],
    hashes: list[int | None],
    history_length: int,
) -> None:
    ints, floats = state.ints, state.floats
    weights = _advance_counters(state, t)  # one per window, then the affinity's
    for i in range(WINDOWS):
        floats[EVENTS + i] += weights[i]
        if purchase:
            floats[PURCHASES + i] += weights[i]
    if purchase:
        floats[AMOUNT_1H] += amount * weights[WINDOWS - 1]
        ints[LAST_PURCHASE] = max(ints[LAST_PURCHASE], t)
    if event.event_type == "login":
        ints[LAST_LOGIN] = max(ints[LAST_LOGIN], t)
    taste = _AFFINITY_EVENTS.get(event.event_type)
    if taste is not None and event.category_id is not None:
        _add_affinity(floats, float(event.category_id), taste * weights[WINDOWS])
    ints[SESSION_EVENTS] += 1
    ints[SESSION_LAST] = max(ints[SESSION_LAST], t)
    ints[LAST_TIME] = max(ints[LAST_TIME], t)
    if event.event_type == "product_view":
        ints[SESSION_VIEWS] += 1
    if event.item_id is not None:
        item = _int32(event.item_id)
        items = state.session_items
        if len(items) < MAX_SESSION_ITEMS and item not in items:
            items.append(item)
        history = state.history
        history.append(item)
        history.append(_int32(event.category_id) if event.category_id is not None else -1)
        if len(history) > 2 * history_length:
            del history[:2]
    for value, h, seen in zip(values, hashes, state.seen, strict=True):
        if value and h is not None:
            _remember(seen, h, t)


def _advance_counters(state: UserState, t: int) -> list[float]:
    """Decay counters and affinities to max(t, counter time); return the weight an event at
    t adds to each window's counters, then to the affinities.
    """
    ints, floats = state.ints, state.floats
    elapsed = t - ints[COUNTER_TIME]
    if elapsed >= 0:
        for i, tau in enumerate(_DECAY_MS):
            factor = math.exp(-elapsed / tau)
            floats[EVENTS + i] *= factor
            floats[PURCHASES + i] *= factor
            if i == WINDOWS - 1:
                floats[AMOUNT_1H] *= factor
        factor = math.exp(-elapsed / _AFFINITY_TAU_MS)
        for slot in range(AFFINITY + 1, AFFINITY + 2 * spec.AFFINITY_SLOTS, 2):
            floats[slot] *= factor
        ints[COUNTER_TIME] = t
        return [1.0] * WINDOWS + [1.0]
    return [math.exp(elapsed / tau) for tau in _DECAY_MS] + [math.exp(elapsed / _AFFINITY_TAU_MS)]


def _affinity(floats: array[float], category: int | None) -> float:
    """The share of the user's decayed category weight that is `category`'s (0 if unseen)."""
    if category is None:
        return 0.0
    total = mine = 0.0
    for slot in range(AFFINITY, AFFINITY + 2 * spec.AFFINITY_SLOTS, 2):
        weight = floats[slot + 1]
        total += weight
        if weight > 0 and floats[slot] == category:
            mine = weight
    return mine / total if total > 0 else 0.0


def _add_affinity(floats: array[float], category: float, weight: float) -> None:
    """Add `weight` to `category`'s slot, taking the lightest slot when it has none."""
    lightest = AFFINITY
    for slot in range(AFFINITY, AFFINITY + 2 * spec.AFFINITY_SLOTS, 2):
        if floats[slot + 1] > 0 and floats[slot] == category:
            floats[slot + 1] += weight
            return
        if floats[slot + 1] < floats[lightest + 1]:
            lightest = slot
    floats[lightest] = category
    floats[lightest + 1] = weight


def _remember(seen: array[int], h: int, t: int) -> None:
    """Record value hash `h` seen at `t`; beyond MAX_SEEN, forget the longest unseen."""
    hashes = seen[0::2]
    if h in hashes:
        i = 2 * hashes.index(h) + 1
        seen[i] = max(seen[i], t)
        return
    seen.append(h)
    seen.append(t)
    if len(seen) > 2 * MAX_SEEN:
        times = seen[1::2]
        oldest = 2 * times.index(min(times))
        del seen[oldest : oldest + 2]


def _int32(value: int) -> int:
    """Ids beyond int32 are all past any model vocabulary: keep them as one unknown id."""
    return value if -_INT32_MAX <= value <= _INT32_MAX else _INT32_MAX


def _categorical(event: ClickEvent) -> list[int]:
    return [
        spec.event_type_index(event.event_type),
        spec.device_type_index(event.user_agent),
        spec.country_bucket(event.country),
        spec.payment_method_index(event.payment_method),
    ]


def _since(t: int, then: int) -> float:
    return _LONG_AGO_S if then == NEVER else (t - then) / 1000.0


def feature_digests(batch: FeatureBatch) -> list[str]:
    """Per row, a digest of everything the engines read: equal digests, equal features."""
    digests = []
    for row in range(len(batch.numeric)):
        digest = hashlib.blake2b(digest_size=12)
        digest.update(batch.numeric[row].tobytes())
        digest.update(batch.categorical[row].tobytes())
        digest.update(batch.history_items[row].tobytes())
        digest.update(batch.history_categories[row].tobytes())
        digests.append(digest.hexdigest())
    return digests
