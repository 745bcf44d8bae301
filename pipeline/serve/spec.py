"""Names, order, computation versions and encodings of the features the engines read.
Models record their hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib

# Velocity windows, seconds. Counters decay exponentially with these time constants.
WINDOWS_S = (60.0, 600.0, 3600.0)
# Category affinity: decayed view/cart/purchase counts of a user's top categories.
AFFINITY_TAU_S = 86_400.0
AFFINITY_SLOTS = 6

# Every feature the engines read, in the order of their columns, with the version of its
# computation. Change how a feature is computed, not only where it sits, and bump its
# version: the hash a model records covers names, order and versions, so a model trained on
# the old computation is refused instead of served skewed inputs. Columns are found by name
# (`numeric_column`); the kernel writes each by name, never by position.
FRAUD_NUMERIC_VERSIONS: dict[str, int] = {
    "payment_amount_log": 1,
    "price_log": 1,
    "quantity_log": 1,
    "is_payment_event": 1,
    "first_event_of_user": 1,
    "session_events_log": 1,
    "session_duration_log": 1,
    "session_distinct_items_log": 1,
    "session_views_before_payment_log": 1,
    "since_last_event_log": 1,
    "since_last_login_log": 1,
    "since_last_purchase_log": 1,
    "user_age_log": 1,
    "events_1m_log": 1,
    "events_10m_log": 1,
    "events_1h_log": 1,
    "purchases_1m_log": 1,
    "purchases_10m_log": 1,
    "purchases_1h_log": 1,
    "amount_1h_log": 1,
    "distinct_devices_1h": 1,
    "distinct_ips_1h": 1,
    "distinct_cards_1h": 1,
    "distinct_countries_1h": 1,
    "new_device": 1,
    "new_ip": 1,
    "new_country": 1,
    "new_card": 1,
    "session_new_device": 1,
    "session_new_ip": 1,
    "session_new_country": 1,
    "session_new_card": 1,
    "billing_country_mismatch": 1,
    "category_affinity": 1,
}
FRAUD_CATEGORICAL_VERSIONS: dict[str, int] = {
    "event_type": 1,
    "device_type": 1,
    "country_bucket": 1,
    "payment_method": 1,
}
FRAUD_NUMERIC: tuple[str, ...] = tuple(FRAUD_NUMERIC_VERSIONS)
FRAUD_CATEGORICAL: tuple[str, ...] = tuple(FRAUD_CATEGORICAL_VERSIONS)


def numeric_column(name: str) -> int:
    """The column of numeric feature `name` in the feature matrix."""
    try:
        return FRAUD_NUMERIC.index(name)
    except ValueError:
        raise KeyError(f"no numeric feature named {name!r}") from None


EVENT_TYPES = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "begin_checkout",
    "purchase",
    "login",
    "logout",
    "add_payment_method",
    "change_address",
    "unknown",
)
PAYMENT_METHODS = ("card", "wallet", "bank_transfer", "gift_card", "buy_now_pay_later", "other")
DEVICE_TYPES = ("other", "mobile", "tablet", "desktop", "bot")
COUNTRY_BUCKETS = 64

# Vocabulary size of each categorical, index 0 meaning missing or unknown.
CATEGORICAL_CARDINALITY: dict[str, int] = {
    "event_type": len(EVENT_TYPES) + 1,
    "device_type": len(DEVICE_TYPES),
    "country_bucket": COUNTRY_BUCKETS + 1,
    "payment_method": len(PAYMENT_METHODS) + 1,
}

_EVENT_TYPE_INDEX = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
_PAYMENT_INDEX = {name: i + 1 for i, name in enumerate(PAYMENT_METHODS)}


def event_type_index(event_type: str) -> int:
    """1-based index of an event type; 0 for one this model does not know."""
    return _EVENT_TYPE_INDEX.get(event_type, 0)


def payment_method_index(method: str | None) -> int:
    """1-based index of a payment method; 0 when absent."""
    return 0 if method is None else _PAYMENT_INDEX.get(method, 0)


@functools.lru_cache(maxsize=4096)  # few distinct agents; bounded for hostile input
def device_type_index(user_agent: str) -> int:
    """A coarse device class from the user agent."""
    agent = user_agent.lower()
    if not agent:
        return 0
    if "headless" in agent or "bot" in agent or "python-requests" in agent or "curl" in agent:
        return DEVICE_TYPES.index("bot")
    if "ipad" in agent or "tablet" in agent:
        return DEVICE_TYPES.index("tablet")
    if "mobile" in agent or "android" in agent or "iphone" in agent:
        return DEVICE_TYPES.index("mobile")
    if "windows" in agent or "macintosh" in agent or "x11" in agent:
        return DEVICE_TYPES.index("desktop")
    return 0


@functools.lru_cache(maxsize=1024)
def country_bucket(country: str) -> int:
    """A stable hash bucket in 1..COUNTRY_BUCKETS for a country code; 0 when empty."""
    if not country:
        return 0
    return zlib.crc32(country.encode()) % COUNTRY_BUCKETS + 1


def feature_hash() -> str:
    """Fingerprint of the feature contract; a model trained on another one must not load."""
    contract = {
        "numeric": list(FRAUD_NUMERIC_VERSIONS.items()),
        "categorical": list(FRAUD_CATEGORICAL_VERSIONS.items()),
        "cardinality": CATEGORICAL_CARDINALITY,
        "windows": WINDOWS_S,
    }
    return hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()[:16]
