"""Turns events into engine inputs while updating each user's state.

Velocity windows are exponentially decayed counters with the window as time constant: O(1)
memory per user and exact under out-of-order events, at the cost of soft window edges. An
event older than the user's latest adds its weight decayed to the latest time instead of 1.
Distinct counts keep each value's last-seen time and count those inside the window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.events import PAYMENT_EVENTS, ClickEvent
from pipeline.features import spec
from pipeline.features.state import MAX_SEEN, MAX_SESSION_ITEMS, NEVER, FeatureStore, UserState

_LONG_AGO_S = 1e7  # stands in for "never" in since-last features
_HOUR_MS = 3_600_000
_DECAY_MS = [window * 1000.0 for window in spec.WINDOWS_S]
_LOG_COLUMNS = [i for i, name in enumerate(spec.FRAUD_NUMERIC) if name.endswith("_log")]


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Engine inputs for a batch of events, row i belonging to event i."""

    numeric: np.ndarray  # float32 (B, len(FRAUD_NUMERIC))
    categorical: np.ndarray  # int64 (B, len(FRAUD_CATEGORICAL))
    history_items: np.ndarray  # int64 (B, L), -1 pads the front of short histories
    history_categories: np.ndarray  # int64 (B, L)


class FeatureUpdater:
    """Computes each event's features from the state before it, then folds it in."""

    def __init__(self, store: FeatureStore, session_gap_s: float) -> None:
        """An updater over `store`; a gap over `session_gap_s` starts a new session."""
        self.store = store
        self._gap_ms = session_gap_s * 1000.0

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
                items, cats = zip(*state.history, strict=True)
                hist_items[row, length - len(items) :] = items
                hist_cats[row, length - len(cats) :] = cats
            numeric[row] = self._update(state, event)
            categorical[row] = _categorical(event)
        # One vectorised log1p per batch instead of a math.log1p per feature per event.
        logged = numeric[:, _LOG_COLUMNS]
        numeric[:, _LOG_COLUMNS] = np.log1p(np.maximum(logged, 0.0))
        return FeatureBatch(numeric, categorical, hist_items, hist_cats)

    def _update(self, state: UserState, event: ClickEvent) -> list[float]:
        """The event's raw feature row (columns named *_log are logged per batch)."""
        t = event.event_time
        first = state.last_time == NEVER
        if first or t - state.session_last > self._gap_ms:
            _new_session(state, t)
        novelty = [
            0.0 if first or value is None or value in seen else 1.0
            for value, seen in (
                (event.device_id, state.devices),
                (event.ip, state.ips),
                (event.country, state.countries),
                (event.card_fingerprint, state.cards),
            )
        ]
        state.session_novelty = [
            max(a, b) for a, b in zip(state.session_novelty, novelty, strict=True)
        ]
        payment = event.event_type in PAYMENT_EVENTS
        purchase = event.event_type == "purchase"
        amount = event.payment_amount or 0.0
        since_last = _since(t, state.last_time)
        _fold(state, event, t, purchase, amount)
        distinct = [
            sum(1 for seen_at in seen.values() if t - seen_at <= _HOUR_MS)
            for seen in (state.devices, state.ips, state.cards, state.countries)
        ]
        billing = event.billing_country
        return [
            amount,
            event.price or 0.0,
            event.quantity or 0,
            float(payment),
            float(first),
            state.session_events,
            (state.session_last - state.session_start) / 1000.0,
            len(state.session_items),
            state.session_views if payment else 0,
            since_last,
            _since(t, state.last_login),
            _since(t, state.last_purchase),
            (t - state.first_seen) / 1000.0,
            *state.events,
            *state.purchases,
            state.amount_1h,
            *(float(count) for count in distinct),
            *novelty,
            *state.session_novelty,
            float(billing is not None and bool(event.country) and billing != event.country),
        ]


def _new_session(state: UserState, t: int) -> None:
    state.session_start = t
    state.session_events = 0
    state.session_views = 0
    state.session_items.clear()
    state.session_novelty = [0.0, 0.0, 0.0, 0.0]


def _fold(state: UserState, event: ClickEvent, t: int, purchase: bool, amount: float) -> None:
    weights = _advance_counters(state, t)
    for i, weight in enumerate(weights):
        state.events[i] += weight
        if purchase:
            state.purchases[i] += weight
    if purchase:
        state.amount_1h += amount * weights[-1]
        state.last_purchase = max(state.last_purchase, t)
    if event.event_type == "login":
        state.last_login = max(state.last_login, t)
    state.session_events += 1
    state.session_last = max(state.session_last, t)
    state.last_time = max(state.last_time, t)
    if event.event_type == "product_view":
        state.session_views += 1
    if event.item_id is not None:
        if len(state.session_items) < MAX_SESSION_ITEMS:
            state.session_items.add(event.item_id)
        state.history.append(
            (event.item_id, event.category_id if event.category_id is not None else -1)
        )
    for value, seen in (
        (event.device_id, state.devices),
        (event.ip, state.ips),
        (event.country, state.countries),
        (event.card_fingerprint, state.cards),
    ):
        if value:
            _remember(seen, value, t)


def _advance_counters(state: UserState, t: int) -> list[float]:
    """Decay counters to max(t, counter time); the weight event time t adds to each."""
    elapsed = t - state.counter_time
    if elapsed >= 0:
        for i, tau in enumerate(_DECAY_MS):
            factor = math.exp(-elapsed / tau)
            state.events[i] *= factor
            state.purchases[i] *= factor
            if i == len(_DECAY_MS) - 1:
                state.amount_1h *= factor
        state.counter_time = t
        return [1.0] * len(_DECAY_MS)
    return [math.exp(elapsed / tau) for tau in _DECAY_MS]


def _remember(seen: dict[str, int], value: str, t: int) -> None:
    seen[value] = max(seen.get(value, t), t)
    if len(seen) > MAX_SEEN:
        del seen[min(seen, key=seen.__getitem__)]


def _categorical(event: ClickEvent) -> list[int]:
    return [
        spec.event_type_index(event.event_type),
        spec.device_type_index(event.user_agent),
        spec.country_bucket(event.country),
        spec.payment_method_index(event.payment_method),
    ]


def _since(t: int, then: int) -> float:
    return _LONG_AGO_S if then == NEVER else (t - then) / 1000.0


def compute_features(
    events: Iterable[ClickEvent],
    history_length: int,
    session_gap_s: float,
    all_histories: bool = False,
) -> FeatureBatch:
    """The reference: features of an event log computed offline from empty state."""
    updater = FeatureUpdater(FeatureStore(history_length), session_gap_s)
    return updater.process(list(events), all_histories=all_histories)
