"""Features: one compiled pass folds a batch's columns into the user table and writes the
feature matrix the engines read.

The semantics are `updater.FeatureUpdater`'s, which stays as the readable reference and the
oracle of tests/pipeline/serve/features/test_fold.py: features of an event come from its user's
state before it; the late-event rule scores an event far behind its user's newest from a
scratch copy of the state; an event already folded into a restored state (its offset is
not past the state's) is a replay and is dropped. The comments below name the reference
function each kernel mirrors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

import schemas
from pipeline.serve import spec
from pipeline.serve.decode import BatchDecoder
from pipeline.serve.events import ClickEvent
from pipeline.serve.features.updater import log_columns
from pipeline.serve.kernel import (
    Bools,
    Bytes,
    Float32s,
    Float64s,
    Int64s,
    UInt64s,
    inline_kernel,
    kernel,
)
from pipeline.serve.records import (
    AMOUNT,
    BILLING_COUNTRY,
    CARD_FINGERPRINT,
    CATEGORY,
    COUNTRY,
    DEVICE_ID,
    EVENT_TYPE_SYMBOLS,
    HAS_AMOUNT,
    HAS_CATEGORY,
    HAS_ITEM,
    HAS_PRICE,
    HAS_QUANTITY,
    IP,
    ITEM,
    METHOD,
    PRICE,
    QUANTITY,
    TIME,
    TYPE,
    USER_AGENT,
    USER_ID,
    EventArrays,
    EventColumns,
    FeatureBatch,
)
from pipeline.serve.state.layout import (
    KINDS,
    Slots,
    hashes_of,
    history_of,
    items_of,
    promote,
    times_of,
)
from pipeline.serve.state.pseudonym import Pseudonyms, pseudonym
from pipeline.serve.state.recency import Recency, touch
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
    SESSION_EVENTS,
    SESSION_LAST,
    SESSION_NOVELTY,
    SESSION_START,
    SESSION_VIEWS,
    WINDOWS,
)
from pipeline.serve.state.table import SCRATCH, UserTable
from pipeline.settings import LimitSettings
from schemas.codec import Encoder

_LONG_AGO_S = 1e7
_HOUR_MS = 3_600_000
_DECAY_MS = np.array([window * 1000.0 for window in spec.WINDOWS_S])
_AFFINITY_TAU_MS = spec.AFFINITY_TAU_S * 1000.0
_AFFINITY_SLOTS = spec.AFFINITY_SLOTS
_INT32_MAX = 2**31 - 1
# EventType wire indices, from schemas/click_event.avsc.
_PRODUCT_VIEW, _ADD_TO_CART, _BEGIN_CHECKOUT, _PURCHASE, _LOGIN, _ADD_PAYMENT = (
    EVENT_TYPE_SYMBOLS.index(name)
    for name in (
        "product_view",
        "add_to_cart",
        "begin_checkout",
        "purchase",
        "login",
        "add_payment_method",
    )
)
_N_NUMERIC = len(spec.FRAUD_NUMERIC)
# What `_update` computes, by name. Each goes to the column `spec` gives that name, through
# `_COLUMNS` (an argument, not a global: numba's cache is keyed on this file, so a global
# would keep an old spec's layout compiled in).
_OUTPUTS = (
    "payment_amount_log",
    "price_log",
    "quantity_log",
    "is_payment_event",
    "first_event_of_user",
    "session_events_log",
    "session_duration_log",
    "session_distinct_items_log",
    "session_views_before_payment_log",
    "since_last_event_log",
    "since_last_login_log",
    "since_last_purchase_log",
    "user_age_log",
    *(f"events_{window}_log" for window in ("1m", "10m", "1h")),  # spec.WINDOWS_S
    *(f"purchases_{window}_log" for window in ("1m", "10m", "1h")),
    "amount_1h_log",
    # per seen kind, in state.SEEN_KINDS order: device, ip, country, card
    *("distinct_devices_1h", "distinct_ips_1h", "distinct_countries_1h", "distinct_cards_1h"),
    *(f"new_{kind}" for kind in ("device", "ip", "country", "card")),
    *(f"session_new_{kind}" for kind in ("device", "ip", "country", "card")),
    "billing_country_mismatch",
    "category_affinity",
)
if sorted(_OUTPUTS) != sorted(spec.FRAUD_NUMERIC):  # a feature added to one and not the other
    raise ImportError(
        f"the features kernel computes {sorted(set(_OUTPUTS) ^ set(spec.FRAUD_NUMERIC))} "
        "that spec does not name, or the reverse"
    )
_COLUMNS = np.array([spec.numeric_column(name) for name in _OUTPUTS], dtype=np.int64)
_O_AMOUNT = _OUTPUTS.index("payment_amount_log")
_O_PRICE = _OUTPUTS.index("price_log")
_O_QUANTITY = _OUTPUTS.index("quantity_log")
_O_PAYMENT = _OUTPUTS.index("is_payment_event")
_O_FIRST = _OUTPUTS.index("first_event_of_user")
_O_SESSION_EVENTS = _OUTPUTS.index("session_events_log")
_O_SESSION_DURATION = _OUTPUTS.index("session_duration_log")
_O_SESSION_ITEMS = _OUTPUTS.index("session_distinct_items_log")
_O_VIEWS_BEFORE_PAYMENT = _OUTPUTS.index("session_views_before_payment_log")
_O_SINCE_LAST = _OUTPUTS.index("since_last_event_log")
_O_SINCE_LOGIN = _OUTPUTS.index("since_last_login_log")
_O_SINCE_PURCHASE = _OUTPUTS.index("since_last_purchase_log")
_O_USER_AGE = _OUTPUTS.index("user_age_log")
_O_EVENTS = _OUTPUTS.index("events_1m_log")  # then one per window
_O_PURCHASES = _OUTPUTS.index("purchases_1m_log")  # then one per window
_O_AMOUNT_1H = _OUTPUTS.index("amount_1h_log")
_O_DISTINCT = _OUTPUTS.index("distinct_devices_1h")  # then one per seen kind
_O_NEW = _OUTPUTS.index("new_device")  # then one per seen kind
_O_SESSION_NEW = _OUTPUTS.index("session_new_device")  # then one per seen kind
_O_MISMATCH = _OUTPUTS.index("billing_country_mismatch")
_O_AFFINITY = _OUTPUTS.index("category_affinity")
_DEVICE = {name: spec.DEVICE_TYPES.index(name) for name in ("bot", "tablet", "mobile", "desktop")}


def _crc_table() -> np.ndarray:
    # CRC-32 (zlib's, reflected polynomial 0xEDB88320); tests check it against zlib.crc32.
    # It only buckets the country feature (`spec.country_bucket`); what state keeps to
    # compare is a keyed pseudonym (`pseudonym.py`).
    table = np.zeros(256, dtype=np.int64)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        table[byte] = crc
    return table


_CRC = _crc_table()
# Substrings of `spec.device_type_index`, lower case, with the class each one means.
_AGENT_WORDS = (
    (b"headless", _DEVICE["bot"]),
    (b"bot", _DEVICE["bot"]),
    (b"python-requests", _DEVICE["bot"]),
    (b"curl", _DEVICE["bot"]),
    (b"ipad", _DEVICE["tablet"]),
    (b"tablet", _DEVICE["tablet"]),
    (b"mobile", _DEVICE["mobile"]),
    (b"android", _DEVICE["mobile"]),
    (b"iphone", _DEVICE["mobile"]),
    (b"windows", _DEVICE["desktop"]),
    (b"macintosh", _DEVICE["desktop"]),
    (b"x11", _DEVICE["desktop"]),
)
_WORD_BYTES = np.frombuffer(b"".join(word for word, _ in _AGENT_WORDS), dtype=np.uint8).copy()
_WORD_START = np.cumsum([0] + [len(word) for word, _ in _AGENT_WORDS]).astype(np.int64)
_WORD_CLASS = np.array([cls for _, cls in _AGENT_WORDS], dtype=np.int64)


def _word_pairs() -> np.ndarray:
    """Per pair of lower-case bytes (first * 256 + second): a bit per word that starts with
    them. A user agent is scanned once, testing only the words its byte pairs start; testing
    every word at every position cost 3 µs an event (67-byte agents, 12 words).
    """
    pairs = np.zeros(65536, dtype=np.int64)
    for w, (word, _) in enumerate(_AGENT_WORDS):
        assert len(word) >= 2 and word == word.lower(), word
        pairs[word[0] * 256 + word[1]] |= 1 << w
    return pairs


class Agents(NamedTuple):
    """The words `_device_type` looks for in a user agent, as arrays."""

    words: Bytes  # the words joined, lower case
    word_start: Int64s  # (words + 1,): word w is words[word_start[w]:word_start[w + 1]]
    word_class: Int64s  # (words,): the device class each word means
    pairs: Int64s  # (65536,): `_word_pairs`
    precedence: Int64s  # the classes, the one that wins first


_AGENTS = Agents(
    _WORD_BYTES,
    _WORD_START,
    _WORD_CLASS,
    _word_pairs(),
    # Precedence of `spec.device_type_index`: bot, then tablet, mobile, desktop.
    np.array([_DEVICE[name] for name in ("bot", "tablet", "mobile", "desktop")], np.int64),
)


class Rules(NamedTuple):
    """What the fold is told besides the batch and the table: the settings, the pseudonyms'
    key, and its constant tables (arguments, not globals: numba's cache is keyed on this
    file, so a global would keep an old table compiled in).
    """

    all_histories: bool  # fill every event's history, not only those with candidates
    gap_ms: float  # session gap
    lateness_ms: float  # allowed lateness
    key_state: UInt64s  # (2,): `Pseudonyms.key_state`
    crc: Int64s  # (256,): `_crc_table`
    decay_ms: Float64s  # (WINDOWS,): each window's decay
    columns: Int64s  # (len(_OUTPUTS),): the column of each output
    agents: Agents


class Scratch(NamedTuple):
    """The fold's per-event working space: a kernel does not allocate."""

    hashes: Int64s  # (KINDS,): each seen kind's pseudonym, -1 for null
    nonempty: Bools  # (KINDS,)
    novelty: Float64s  # (KINDS,)
    weights: Float64s  # (WINDOWS + 1,): each window's weight of a late event, then affinity's


def compute_features(
    events: Iterable[ClickEvent],
    history_length: int,
    session_gap_s: float,
    all_histories: bool = False,
    allowed_lateness_s: float = float("inf"),
    chunk: int = 50_000,
) -> FeatureBatch:
    """Features of an event log computed offline from an empty table, by the serving path:
    each event is written as its Avro record, decoded by the columnar decoder and folded by
    the same kernel, so training and serving cannot skew. Its pseudonyms are under a random
    key: features depend on which values are equal, not on the key.
    """
    decoder = BatchDecoder(_OFFLINE_LIMITS)
    encoder = Encoder(schemas.CLICK_EVENT)
    featurizer = Featurizer(
        UserTable(history_length), Pseudonyms.ephemeral(), session_gap_s, allowed_lateness_s
    )
    batches: list[FeatureBatch] = []
    log = list(events)
    for first in range(0, len(log), chunk):
        part = log[first : first + chunk]
        records = [{name: getattr(event, name) for name in _RECORD_FIELDS} for event in part]
        positions = np.array(
            [(event.partition, event.offset, event.ingest_time) for event in part],
            dtype=np.int64,
        ).reshape(len(part), 3)
        columns, rejected = decoder.decode_values(
            [encoder.encode(record) for record in records],
            [event.user_id.encode() for event in part],
            positions,
            0,
        )
        if rejected:
            first_bad = rejected[0]
            raise ValueError(
                f"event {first + first_bad.row} is not valid: {first_bad.kind}: {first_bad.detail}"
            )
        _, features = featurizer.process(
            columns, np.arange(len(part), dtype=np.int64), all_histories=all_histories
        )
        batches.append(features)
    if not batches:
        return featurizer.process(*_no_events(decoder), all_histories=all_histories)[1]
    return FeatureBatch(
        *(np.concatenate([getattr(b, name) for b in batches]) for name in _BATCH_FIELDS)
    )


def _no_events(decoder: BatchDecoder) -> tuple[EventColumns, np.ndarray]:
    columns, _ = decoder.decode_values([], [], np.zeros((0, 3), dtype=np.int64), 0)
    return columns, np.zeros(0, dtype=np.int64)


# An offline log is replayed, not live: any event time is acceptable.
_OFFLINE_LIMITS = LimitSettings(max_event_age_s=1e12, max_future_skew_s=1e12)
_RECORD_FIELDS = tuple(field["name"] for field in schemas.raw(schemas.CLICK_EVENT)["fields"])
_BATCH_FIELDS = ("numeric", "categorical", "history_items", "history_categories")


class Featurizer:
    """Computes each event's features from the user table, then folds the event in."""

    def __init__(
        self,
        table: UserTable,
        pseudonyms: Pseudonyms,
        session_gap_s: float,
        allowed_lateness_s: float = float("inf"),
    ) -> None:
        """A featurizer over `table` that remembers values as `pseudonyms`; see
        `FeatureUpdater` for the two settings.
        """
        self.table = table
        self.pseudonyms = pseudonyms
        self._scratch = Scratch(
            np.empty(KINDS, dtype=np.int64),
            np.empty(KINDS, dtype=np.bool_),
            np.zeros(KINDS),
            np.ones(WINDOWS + 1),
        )
        self._gap_ms = session_gap_s * 1000.0
        self._lateness_ms = allowed_lateness_s * 1000.0
        self.late = 0

    def process(
        self, columns: EventColumns, rows: np.ndarray, all_histories: bool = False
    ) -> tuple[np.ndarray, FeatureBatch]:
        """The rows of `rows` (ascending, as `np.flatnonzero` gives them) that are not
        replays, and their features in that order.

        Each row's item history is the user's sequence before its event; it is filled for
        events that carry candidates, or for every event when `all_histories` (training).
        """
        table = self.table
        # A valid event's key is its user id (validation checks it), so the user id's span
        # in the batch's buffer is the key.
        user = columns.spans[rows, USER_ID]
        slots = table.slots_in(columns.partition[rows], columns.buffer, user[:, 0], user[:, 1])
        c = table.columns
        kept_mask = np.empty(len(slots), dtype=np.bool_)
        _fresh(slots, columns.offset[rows], c.ints, c.pending, kept_mask)
        kept, slots = rows[kept_mask], slots[kept_mask]
        length = table.history_length
        n = len(kept)
        out = FeatureBatch(
            numeric=np.zeros((n, _N_NUMERIC), dtype=np.float32),
            categorical=np.zeros((n, len(spec.FRAUD_CATEGORICAL)), dtype=np.int64),
            history_items=np.full((n, length), -1, dtype=np.int64),
            history_categories=np.full((n, length), -1, dtype=np.int64),
        )
        newly = np.empty(n, dtype=np.int64)
        table.pool.reserve(n)  # each event moves at most its own user to the pool
        rules = Rules(
            all_histories, self._gap_ms, self._lateness_ms, self.pseudonyms.key_state, _CRC,
            _DECAY_MS, _COLUMNS, _AGENTS,
        )  # fmt: skip
        late, flagged = _fold(
            columns.arrays(), kept, slots, table.slots_view(), table.recency_view(), out,
            newly, self._scratch, rules,
        )  # fmt: skip
        table.mark_changed(newly[:flagged])
        self.late += late
        log_columns(out.numeric)
        return kept, out


@kernel
def _fresh(
    slots: np.ndarray, offsets: np.ndarray, ints: np.ndarray, pending: np.ndarray, kept: np.ndarray
) -> None:
    """`FeatureUpdater.fresh` into `kept`: False for an event its user's state already
    holds.
    """
    for i in range(len(slots)):
        s = slots[i]
        kept[i] = not (offsets[i] >= 0 and not pending[s] and offsets[i] <= ints[s, OFFSET])


@kernel
def crc32(buf: np.ndarray, start: int, length: int, table: np.ndarray) -> int:
    """zlib.crc32 of buf[start:start + length]."""
    crc = np.int64(0xFFFFFFFF)
    for k in range(start, start + length):
        crc = table[(crc ^ buf[k]) & 0xFF] ^ (crc >> 8)
    return int(crc ^ 0xFFFFFFFF)


@inline_kernel
def _lower(b: int) -> int:
    return b + 32 if 65 <= b <= 90 else b


@kernel
def _device_type(buf: Bytes, start: int, length: int, agents: Agents) -> int:
    """`spec.device_type_index`: the words are ASCII, so lower-casing ASCII bytes is exact
    (no non-ASCII character lower-cases into a run of them).
    """
    words, word_start, word_class = agents.words, agents.word_start, agents.word_class
    pairs, precedence = agents.pairs, agents.precedence
    found = 0  # a bit per device class
    end = start + length
    for i in range(start, end - 1):
        candidates = pairs[_lower(buf[i]) * 256 + _lower(buf[i + 1])]
        if candidates == 0:
            continue
        for w in range(len(word_class)):
            if not (candidates >> w) & 1:
                continue
            first, size = word_start[w], word_start[w + 1] - word_start[w]
            if i + size > end:
                continue
            match = True
            for k in range(2, size):
                if _lower(buf[i + k]) != words[first + k]:
                    match = False
                    break
            if match:
                found |= 1 << word_class[w]
    for k in range(len(precedence)):
        if (found >> precedence[k]) & 1:
            return int(precedence[k])
    return 0


@kernel
def _same_bytes(buf: np.ndarray, spans: np.ndarray, a: int, b: int) -> bool:
    if spans[a, 1] != spans[b, 1]:
        return False
    for k in range(spans[a, 1]):  # noqa: SIM110 - a loop, not a generator, compiles
        if buf[spans[a, 0] + k] != buf[spans[b, 0] + k]:
            return False
    return True


@inline_kernel
def _equals_int(value: float, number: int) -> bool:
    """Python's float == int: exact, not through a rounded float."""
    if not (-9.223372036854775808e18 <= value < 9.223372036854775808e18):
        return False
    whole = np.int64(value)
    return bool(np.float64(whole) == value and whole == number)


@inline_kernel
def _int32(value: int) -> int:
    return value if -_INT32_MAX <= value <= _INT32_MAX else _INT32_MAX


@inline_kernel
def _since(t: int, then: int) -> float:
    return _LONG_AGO_S if then == NEVER else (t - then) / 1000.0


@kernel
def _copy_slot(source: int, target: int, table: Slots) -> None:
    """Copy a user into the scratch slot (`target`, which always works in a pool row)."""
    ints, floats, v = table.ints, table.floats, table.var
    history_len, items_len, seen_len = table.history_len, table.items_len, table.seen_len
    for k in range(ints.shape[1]):  # element by element: a slice copy may allocate
        ints[target, k] = ints[source, k]
    for k in range(floats.shape[1]):
        floats[target, k] = floats[source, k]
    history_len[target] = history_len[source]
    items_len[target] = items_len[source]
    for kind in range(KINDS):
        seen_len[target, kind] = seen_len[source, kind]
    history, to_history = history_of(source, v), history_of(target, v)
    for k in range(history_len[source]):
        to_history[k] = history[k]
    items, to_items = items_of(source, v), items_of(target, v)
    for k in range(items_len[source]):
        to_items[k] = items[k]
    hashes, to_hashes = hashes_of(source, v), hashes_of(target, v)
    times, to_times = times_of(source, v), times_of(target, v)
    for kind in range(KINDS):
        for k in range(seen_len[source, kind]):
            to_hashes[kind, k] = hashes[kind, k]
            to_times[kind, k] = times[kind, k]


@kernel
def _fold(
    events: EventArrays,
    rows: Int64s,
    slots: Int64s,
    table: Slots,
    r: Recency,
    out: FeatureBatch,
    newly: Int64s,
    scratch: Scratch,
    rules: Rules,
) -> tuple[int, int]:
    """`FeatureUpdater.process` over `rows` (their users' `slots`), writing row i of `out`
    for rows[i]; the late count and how many slots were newly flagged changed (their slots
    are `newly[:count]`).
    """
    buf, spans, longs = events.buffer, events.spans, events.longs
    candidate_start, offsets = events.candidate_start, events.offset
    hist_items, hist_cats, categorical = out.history_items, out.history_categories, out.categorical
    hashes, nonempty = scratch.hashes, scratch.nonempty
    ints = table.ints
    length = hist_items.shape[1]
    late = 0
    flagged = 0
    for i in range(len(rows)):
        row = rows[i]
        s = slots[i]
        t = longs[row, TIME]
        if touch(s, t, table, r):
            newly[flagged] = s
            flagged += 1
        n_candidates = candidate_start[row + 1] - candidate_start[row]
        pairs = table.history_len[s] // 2
        if (rules.all_histories or n_candidates > 0) and pairs > 0:
            history = history_of(s, table.var)
            for k in range(pairs):
                hist_items[i, length - pairs + k] = history[2 * k]
                hist_cats[i, length - pairs + k] = history[2 * k + 1]
        for kind, field in enumerate((DEVICE_ID, IP, COUNTRY, CARD_FINGERPRINT)):
            size = spans[row, field, 1]
            hashes[kind] = (
                -1 if size < 0 else pseudonym(buf, spans[row, field, 0], size, rules.key_state)
            )
            nonempty[kind] = size > 0
        billing = spans[row, BILLING_COUNTRY, 1]
        mismatch = (
            billing >= 0
            and spans[row, COUNTRY, 1] > 0
            and not _same_bytes(buf, spans[row], BILLING_COUNTRY, COUNTRY)
        )
        target = s
        last = ints[s, LAST_TIME]
        if last != NEVER and t < last - rules.lateness_ms:  # late: scored, state unchanged
            late += 1
            _copy_slot(s, SCRATCH, table)
            target = SCRATCH
        _update(
            target, t, longs[row], events.reals[row], events.present[row], mismatch, table,
            out.numeric[i], scratch, rules.gap_ms, rules.columns, rules.decay_ms,
        )  # fmt: skip
        if offsets[row] > ints[s, OFFSET]:
            ints[s, OFFSET] = offsets[row]
        categorical[i, 0] = longs[row, TYPE] + 1
        agent = spans[row, USER_AGENT, 1]
        categorical[i, 1] = (
            0 if agent <= 0 else _device_type(buf, spans[row, USER_AGENT, 0], agent, rules.agents)
        )
        country = spans[row, COUNTRY, 1]
        categorical[i, 2] = (
            0 if country <= 0 else crc32(buf, spans[row, COUNTRY, 0], country, rules.crc) % 64 + 1
        )
        categorical[i, 3] = longs[row, METHOD] + 1  # -1 (null) gives 0
    return late, flagged


@kernel
def _update(
    s: int,
    t: int,
    longs: Int64s,
    reals: Float64s,
    present: Bools,
    mismatch: bool,
    table: Slots,
    out: Float32s,
    scratch: Scratch,
    gap_ms: float,
    columns: Int64s,
    decay_ms: Float64s,
) -> None:
    """Fold one event (its row of the batch's `longs`, `reals` and `present`) into slot `s`,
    writing its raw feature row to `out` (each value to the column `columns` gives its
    name). It takes the three fields of `Rules` it reads, not `Rules`: passed whole, once an
    event, the tuple took the features kernel from about 0.58 to 0.71 µs an event
    (1,000-event batches).
    """
    ints, floats, v = table.ints, table.floats, table.var
    items_len, seen_len = table.items_len, table.seen_len
    hashes, nonempty, novelty, weights = (
        scratch.hashes, scratch.nonempty, scratch.novelty, scratch.weights,
    )  # fmt: skip
    first = ints[s, LAST_TIME] == NEVER
    if first or t - ints[s, SESSION_LAST] > gap_ms:  # _new_session
        ints[s, SESSION_START] = t
        ints[s, SESSION_EVENTS] = 0
        ints[s, SESSION_VIEWS] = 0
        items_len[s] = 0
        for i in range(4):
            floats[s, SESSION_NOVELTY + i] = 0.0
    novelty[:] = 0.0
    seen_hash = hashes_of(s, v)
    for kind in range(KINDS):
        h = hashes[kind]
        if first or h < 0:
            continue
        known = False
        for k in range(seen_len[s, kind]):
            if seen_hash[kind, k] == h:
                known = True
                break
        if not known:
            novelty[kind] = 1.0
            floats[s, SESSION_NOVELTY + kind] = 1.0
    event_type = longs[TYPE]
    payment = event_type in (_BEGIN_CHECKOUT, _PURCHASE, _ADD_PAYMENT)
    purchase = event_type == _PURCHASE
    amount = reals[AMOUNT] if present[HAS_AMOUNT] and reals[AMOUNT] != 0.0 else 0.0
    since_last = _since(t, ints[s, LAST_TIME])
    affinity = 0.0  # _affinity
    if present[HAS_CATEGORY]:
        total = mine = 0.0
        for k in range(_AFFINITY_SLOTS):
            weight = floats[s, AFFINITY + 2 * k + 1]
            total += weight
            if weight > 0 and _equals_int(floats[s, AFFINITY + 2 * k], longs[CATEGORY]):
                mine = weight
        affinity = mine / total if total > 0 else 0.0
    # _fold, starting with _advance_counters
    weights[:] = 1.0
    elapsed = t - ints[s, COUNTER_TIME]
    if elapsed >= 0:
        for i in range(WINDOWS):
            factor = np.exp(-elapsed / decay_ms[i])
            floats[s, EVENTS + i] *= factor
            floats[s, PURCHASES + i] *= factor
            if i == WINDOWS - 1:
                floats[s, AMOUNT_1H] *= factor
        factor = np.exp(-elapsed / _AFFINITY_TAU_MS)
        for k in range(_AFFINITY_SLOTS):
            floats[s, AFFINITY + 2 * k + 1] *= factor
        ints[s, COUNTER_TIME] = t
    else:
        for i in range(WINDOWS):
            weights[i] = np.exp(elapsed / decay_ms[i])
        weights[WINDOWS] = np.exp(elapsed / _AFFINITY_TAU_MS)
    for i in range(WINDOWS):
        floats[s, EVENTS + i] += weights[i]
        if purchase:
            floats[s, PURCHASES + i] += weights[i]
    if purchase:
        floats[s, AMOUNT_1H] += amount * weights[WINDOWS - 1]
        ints[s, LAST_PURCHASE] = max(ints[s, LAST_PURCHASE], t)
    if event_type == _LOGIN:
        ints[s, LAST_LOGIN] = max(ints[s, LAST_LOGIN], t)
    taste = 0.0
    if event_type == _PRODUCT_VIEW:
        taste = 1.0
    elif event_type == _ADD_TO_CART:
        taste = 3.0
    elif event_type == _PURCHASE:
        taste = 5.0
    if taste > 0 and present[HAS_CATEGORY]:  # _add_affinity
        category = np.float64(longs[CATEGORY])
        weight = taste * weights[WINDOWS]
        lightest = 0
        added = False
        for k in range(_AFFINITY_SLOTS):
            slot = AFFINITY + 2 * k
            if floats[s, slot + 1] > 0 and floats[s, slot] == category:
                floats[s, slot + 1] += weight
                added = True
                break
            if floats[s, slot + 1] < floats[s, AFFINITY + 2 * lightest + 1]:
                lightest = k
        if not added:
            floats[s, AFFINITY + 2 * lightest] = category
            floats[s, AFFINITY + 2 * lightest + 1] = weight
    ints[s, SESSION_EVENTS] += 1
    ints[s, SESSION_LAST] = max(ints[s, SESSION_LAST], t)
    ints[s, LAST_TIME] = max(ints[s, LAST_TIME], t)
    if event_type == _PRODUCT_VIEW:
        ints[s, SESSION_VIEWS] += 1
    if present[HAS_ITEM]:
        item = _int32(longs[ITEM])
        n_items = items_len[s]
        if n_items < MAX_SESSION_ITEMS:
            items = items_of(s, v)
            known = False
            for k in range(n_items):
                if items[k] == item:
                    known = True
                    break
            if not known:
                if n_items == len(items):  # its inline room is full
                    promote(s, table)
                    items = items_of(s, v)
                items[n_items] = item
                items_len[s] = n_items + 1
        history = history_of(s, v)
        n = table.history_len[s]
        if n == len(history) and n < v.pool_history.shape[1]:  # inline room full
            promote(s, table)
            history = history_of(s, v)
        if n == len(history):  # full: drop the oldest pair
            for k in range(n - 2):
                history[k] = history[k + 2]
            n -= 2
        history[n] = item
        history[n + 1] = _int32(longs[CATEGORY]) if present[HAS_CATEGORY] else -1
        table.history_len[s] = n + 2
    for kind in range(KINDS):
        if nonempty[kind]:
            _remember(s, kind, hashes[kind], t, table)
    # the row: each value to the column of its name
    out[columns[_O_AMOUNT]] = amount
    out[columns[_O_PRICE]] = reals[PRICE] if present[HAS_PRICE] and reals[PRICE] != 0.0 else 0.0
    out[columns[_O_QUANTITY]] = longs[QUANTITY] if present[HAS_QUANTITY] else 0
    out[columns[_O_PAYMENT]] = 1.0 if payment else 0.0
    out[columns[_O_FIRST]] = 1.0 if first else 0.0
    out[columns[_O_SESSION_EVENTS]] = ints[s, SESSION_EVENTS]
    out[columns[_O_SESSION_DURATION]] = (ints[s, SESSION_LAST] - ints[s, SESSION_START]) / 1000.0
    out[columns[_O_SESSION_ITEMS]] = items_len[s]
    out[columns[_O_VIEWS_BEFORE_PAYMENT]] = ints[s, SESSION_VIEWS] if payment else 0
    out[columns[_O_SINCE_LAST]] = since_last
    out[columns[_O_SINCE_LOGIN]] = _since(t, ints[s, LAST_LOGIN])
    out[columns[_O_SINCE_PURCHASE]] = _since(t, ints[s, LAST_PURCHASE])
    out[columns[_O_USER_AGE]] = (t - ints[s, FIRST_SEEN]) / 1000.0
    for i in range(WINDOWS):
        out[columns[_O_EVENTS + i]] = floats[s, EVENTS + i]
        out[columns[_O_PURCHASES + i]] = floats[s, PURCHASES + i]
    out[columns[_O_AMOUNT_1H]] = floats[s, AMOUNT_1H]
    seen_time = times_of(s, v)
    for kind in range(KINDS):
        count = 0
        for k in range(seen_len[s, kind]):
            if t - seen_time[kind, k] <= _HOUR_MS:
                count += 1
        out[columns[_O_DISTINCT + kind]] = count
        out[columns[_O_NEW + kind]] = novelty[kind]
        out[columns[_O_SESSION_NEW + kind]] = floats[s, SESSION_NOVELTY + kind]
    out[columns[_O_MISMATCH]] = 1.0 if mismatch else 0.0
    out[columns[_O_AFFINITY]] = affinity


@kernel
def _remember(s: int, kind: int, h: int, t: int, table: Slots) -> None:
    """`updater._remember`: record hash `h` seen at `t`; with MAX_SEEN + 1 values, drop the
    first of the longest unseen (which may be the new one).
    """
    v, seen_len = table.var, table.seen_len
    seen_hash, seen_time = hashes_of(s, v), times_of(s, v)
    n = seen_len[s, kind]
    for k in range(n):
        if seen_hash[kind, k] == h:
            seen_time[kind, k] = max(seen_time[kind, k], t)
            return
    if n < MAX_SEEN:
        if n == seen_hash.shape[1]:  # its inline room is full
            promote(s, table)
            seen_hash, seen_time = hashes_of(s, v), times_of(s, v)
        seen_hash[kind, n] = h
        seen_time[kind, n] = t
        seen_len[s, kind] = n + 1
        return
    oldest = 0
    for k in range(1, n):
        if seen_time[kind, k] < seen_time[kind, oldest]:
            oldest = k
    if t < seen_time[kind, oldest]:
        return  # the new value is the oldest: appended and dropped at once
    for k in range(oldest, n - 1):
        seen_hash[kind, k] = seen_hash[kind, k + 1]
        seen_time[kind, k] = seen_time[kind, k + 1]
    seen_hash[kind, n - 1] = h
    seen_time[kind, n - 1] = t
