"""A valid ClickEvent record to start tests from."""

from __future__ import annotations

from typing import Any

NOW_MS = 1_767_225_600_000


def click_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e1",
        "user_id": "u1",
        "session_id": "s1",
        "event_time": NOW_MS,
        "event_type": "product_view",
        "item_id": 5,
        "category_id": 2,
        "price": 10.0,
        "quantity": None,
        "currency": None,
        "search_query": None,
        "device_id": "d1",
        "ip": "10.0.0.1",
        "country": "DE",
        "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
        "payment_amount": None,
        "payment_method": None,
        "card_fingerprint": None,
        "billing_country": None,
        "candidates": [],
    }
    record.update(changes)
    return record
