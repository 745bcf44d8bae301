"""The records that cross the stages of `pipeline/serve`, in one place.

- The batch's layout: `EventColumns`, a consumed batch as columns (decode writes it;
  features, score, encode and produce read it), with the indices of its span, long, real
  and presence columns below, the wire indices of the ClickEvent's enums (from the
  schema), and `join`, which makes a batch's values one buffer. `EventArrays` is its
  arrays as one kernel argument.
- `FeatureBatch`: the engines' inputs, one row per event (features write it).
- `Rejected`: a message that is not a valid event, with its position and reason; produce
  turns it into a `DeadLetter` record.
- `Scored` and `ShadowScored`: a batch's scores as columns (score writes them; encode
  writes the FraudScore and Recommendation records from them and the input buffer, with no
  per-record object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict, cast

import numpy as np

import schemas
from pipeline.serve.events import STRING_FIELDS
from pipeline.serve.kernel import Bools, Bytes, Float32s, Float64s, Int8s, Int32s, Int64s

NULL = -1  # span length of a null string

# Span columns: the string fields in the order validation checks their length.
(
    EVENT_ID,
    USER_ID,
    SESSION_ID,
    CURRENCY,
    SEARCH_QUERY,
    DEVICE_ID,
    IP,
    COUNTRY,
    USER_AGENT,
    CARD_FINGERPRINT,
    BILLING_COUNTRY,
) = range(len(STRING_FIELDS))

# Columns of `EventColumns.longs`, `.reals` and `.present`.
TIME, TYPE, ITEM, CATEGORY, QUANTITY, METHOD = range(6)  # longs; METHOD is -1 for null
PRICE, AMOUNT = range(2)  # reals
HAS_ITEM, HAS_CATEGORY, HAS_PRICE, HAS_QUANTITY, HAS_AMOUNT = range(5)  # present


def _enum_symbols(field: str) -> tuple[str, ...]:
    """The symbols of the ClickEvent's enum `field` (nullable or not), in wire order."""
    for spec in schemas.raw(schemas.CLICK_EVENT)["fields"]:
        if spec["name"] == field:
            for branch in spec["type"] if isinstance(spec["type"], list) else [spec["type"]]:
                if isinstance(branch, dict) and branch.get("type") == "enum":
                    return tuple(branch["symbols"])
    raise LookupError(f"click_event has no enum field {field!r}")


# Wire indices of the enums, from the schema (a symbol's index is its position there).
EVENT_TYPE_SYMBOLS = _enum_symbols("event_type")
PAYMENT_METHOD_SYMBOLS = _enum_symbols("payment_method")
DECISIONS = ("allow", "review", "block")


@dataclass(frozen=True, slots=True)
class EventColumns:
    """One consumed batch as columns; row i is message i. Only rows with `status` OK hold
    decoded values. The numeric fields are packed into three 2-D arrays, so a kernel takes
    them as three arguments; the properties name their columns.
    """

    buffer: Bytes  # every value joined
    status: Int8s  # (n,), a STATUS_KINDS index
    spans: Int64s  # (n, len(STRING_FIELDS), 2): start in buffer, length or NULL
    longs: Int64s  # (n, 6): TIME, TYPE, ITEM, CATEGORY, QUANTITY, METHOD
    reals: Float64s  # (n, 2): PRICE, AMOUNT
    present: Bools  # (n, 5): HAS_ITEM ... HAS_AMOUNT
    candidates: Int64s  # every row's candidates in row order
    candidate_start: Int64s  # (n + 1,): row i's are candidates[start[i]:start[i+1]]
    partition: Int32s  # (n,)
    offset: Int64s  # (n,)
    ingest_time: Int64s  # (n,), the message's Kafka timestamp
    keys: list[bytes | None]  # the message keys, as the consumer returned them

    def __len__(self) -> int:
        return len(self.status)

    def arrays(self) -> EventArrays:
        """The columns a kernel reads, as one argument."""
        return EventArrays(
            self.buffer, self.spans, self.longs, self.reals, self.present,
            self.candidate_start, self.offset, self.ingest_time,
        )  # fmt: skip

    def text(self, row: int, field: int) -> str | None:
        """String field `field` of `row` (tests, debugging; not used on the hot path)."""
        start, length = (int(x) for x in self.spans[row, field])
        if length == NULL:
            return None
        return bytes(self.buffer[start : start + length]).decode()


class EventArrays(NamedTuple):
    """`EventColumns`' arrays as a kernel takes them (numba reads a NamedTuple's fields as
    typed arguments; the dataclass also holds Python objects, which a kernel cannot take).
    """

    buffer: Bytes
    spans: Int64s
    longs: Int64s
    reals: Float64s
    present: Bools
    candidate_start: Int64s
    offset: Int64s
    ingest_time: Int64s


@dataclass(frozen=True, slots=True)
class Rejected:
    """A consumed message that is not a valid event: where it was read, and why (the
    dead-letter topic's `error_kind` and `error_message`).
    """

    row: int  # its row in the batch's EventColumns
    partition: int
    offset: int
    kind: str  # a stable name: decode.truncated, validate.price_not_finite, ...
    detail: str


class DeadLetter(TypedDict):
    """A DeadLetter record (schemas/dead_letter.avsc) as the encoder takes it."""

    original_key: bytes | None
    original_value: bytes | None
    source_topic: str
    source_partition: int
    source_offset: int
    error_kind: str
    error_message: str
    failed_time: int
    payload_hash: str | None


@dataclass(frozen=True, slots=True)
class ShadowScored:
    """A challenger's fraud scores of the same rows as its Scored, as columns."""

    score: Float32s  # (n,)
    decision: Int64s  # (n,): what it would have decided, recorded only
    reasons: Int64s  # (n, top_reasons)
    contributions: Float32s  # (n, top_reasons)
    reason_count: Int64s  # (n,)
    fraud_model: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Scored:
    """A batch's scores as columns, ready to encode (`encode.OutputEncoder`)."""

    rows: Int64s  # (n,): the scored events' rows in their EventColumns
    score: Float32s  # (n,)
    decision: Int64s  # (n,): index into DECISIONS
    reasons: Int64s  # (n, top_reasons): index into REASON_NAMES
    contributions: Float32s  # (n, top_reasons), largest first
    reason_count: Int64s  # (n,): the leading reasons that are positive
    fraud_model: tuple[str, str]  # name, version
    ranked: Int64s  # (m,): which of `rows` have a recommendation
    items: Int64s  # (m, top_k): item ids, best first
    item_scores: Float32s  # (m, top_k)
    item_count: Int64s  # (m,)
    ranking_model: tuple[str, str]
    scored_time: int  # epoch milliseconds
    shadow: ShadowScored | None = None


def join(values: Sequence[bytes | None]) -> tuple[Bytes, Int64s, Bools]:
    """`values` as one uint8 buffer, an int64 offsets array (n + 1) and a null mask."""
    if None in values:  # rare (tombstones, keyless messages): the mask costs a pass
        null = np.fromiter((value is None for value in values), dtype=np.bool_, count=len(values))
        parts: Sequence[bytes] = [b"" if value is None else value for value in values]
    else:
        null = np.zeros(len(values), dtype=np.bool_)
        parts = cast(Sequence[bytes], values)
    starts = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=starts[1:])
    buffer = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return buffer, starts, null


class FeatureBatch(NamedTuple):
    """Engine inputs for a batch of events, row i belonging to event i (a NamedTuple: the
    features kernel writes it as one argument).
    """

    numeric: Float32s  # (B, len(FRAUD_NUMERIC))
    categorical: Int64s  # (B, len(FRAUD_CATEGORICAL))
    history_items: Int64s  # (B, L), -1 pads the front of short histories
    history_categories: Int64s  # (B, L)
