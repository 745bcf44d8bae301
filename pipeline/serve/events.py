"""The ClickEvent the pipeline works on, and the rules that make a decoded record valid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.settings import LimitSettings
from schemas.codec import DecodeError

PAYMENT_EVENTS = frozenset({"begin_checkout", "purchase", "add_payment_method"})
STRING_FIELDS = (
    "event_id",
    "user_id",
    "session_id",
    "currency",
    "search_query",
    "device_id",
    "ip",
    "country",
    "user_agent",
    "card_fingerprint",
    "billing_country",
)


@dataclass(slots=True)
class ClickEvent:
    """One valid input event, with where it was read from. Treat it as read-only: it is
    not frozen because a frozen dataclass sets each of its 23 fields through
    object.__setattr__, which made construction half of the decode stage.
    """

    event_id: str
    user_id: str
    session_id: str
    event_time: int
    event_type: str
    item_id: int | None
    category_id: int | None
    price: float | None
    quantity: int | None
    currency: str | None
    search_query: str | None
    device_id: str
    ip: str
    country: str
    user_agent: str
    payment_amount: float | None
    payment_method: str | None
    card_fingerprint: str | None
    billing_country: str | None
    candidates: list[int] = field(default_factory=list)
    partition: int = 0
    offset: int = -1
    ingest_time: int = 0


class InvalidEvent(DecodeError):
    """A record that decoded but breaks a validation rule."""


def validate(record: dict[str, Any], key: bytes | None, limits: LimitSettings, now_ms: int) -> None:
    """Raise InvalidEvent naming the first rule `record` breaks."""
    _check_identity(record, key)
    _check_strings(record, limits)
    _check_amounts(record, limits)
    _check_time(record["event_time"], limits, now_ms)
    if len(record["candidates"]) > limits.max_candidates:
        raise InvalidEvent(
            "validate.too_many_candidates",
            f"{len(record['candidates'])} candidates, limit {limits.max_candidates}",
        )


def _check_identity(record: dict[str, Any], key: bytes | None) -> None:
    if not key:
        raise InvalidEvent("validate.key_missing", "message key (user id) is null or empty")
    if not record["user_id"]:
        raise InvalidEvent("validate.user_id_empty", "user_id is empty")
    if not record["event_id"]:
        raise InvalidEvent("validate.event_id_empty", "event_id is empty")
    if key != record["user_id"].encode():
        raise InvalidEvent("validate.key_mismatch", "message key differs from user_id")


def _check_strings(record: dict[str, Any], limits: LimitSettings) -> None:
    for name in STRING_FIELDS:
        value = record[name]
        if value is not None and len(value) > limits.max_string_length:
            raise InvalidEvent(
                "validate.string_too_long",
                f"{name} has {len(value)} characters, limit {limits.max_string_length}",
            )


def _check_amounts(record: dict[str, Any], limits: LimitSettings) -> None:
    for name in ("price", "payment_amount"):
        value = record[name]
        if value is None:
            continue
        if not math.isfinite(value):
            raise InvalidEvent(f"validate.{name}_not_finite", f"{name} is {value}")
        if value < 0:
            raise InvalidEvent(f"validate.{name}_negative", f"{name} is {value}")
        if value > limits.max_price:
            raise InvalidEvent(
                f"validate.{name}_too_large", f"{name} {value} exceeds {limits.max_price}"
            )
    quantity = record["quantity"]
    if quantity is not None and not 0 < quantity <= limits.max_quantity:
        raise InvalidEvent(
            "validate.quantity_out_of_range", f"quantity {quantity} not in 1..{limits.max_quantity}"
        )


def _check_time(event_time: int, limits: LimitSettings, now_ms: int) -> None:
    if event_time > now_ms + limits.max_future_skew_s * 1000:
        raise InvalidEvent(
            "validate.event_time_future", f"event_time {event_time} is ahead of now {now_ms}"
        )
    if event_time < now_ms - limits.max_event_age_s * 1000:
        raise InvalidEvent(
            "validate.event_time_too_old", f"event_time {event_time} is too far before {now_ms}"
        )
