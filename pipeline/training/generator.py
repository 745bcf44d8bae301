"""Synthetic clickstream with labelled fraud, deterministic for a seed.

Users browse in sessions separated by inactivity gaps, view items with Zipf popularity inside
the categories they like, add to cart and buy after viewing, and ask for recommendations on
pages with a recommendation slot. Three fraud patterns are planted and labelled:

- card_testing: bursts of small purchases, each with a new card, seconds apart;
- account_takeover: a login from a new device, IP and country, then a quick high-value
  purchase with a new card whose billing country differs;
- bot: product views at sub-second rates over random items, often with a headless user agent.

A fourth, `reseller`, is the drift scenario's (`streamscore demo --scenario drift`): from
event `drift_after` on, a `reseller_rate` share of ordinary users' sessions buy popular items in
bulk, purchase after purchase, on their own device, card and country: nothing the first
three patterns taught the model to see. With `reseller_rate` 0 (the default) the stream is what
it always was for a seed.

Labels are yielded beside each event, never inside it. Times are milliseconds from
`start_ms`, and every event falls inside the config's `timeline_s`: the `horizon_s` asked
for, grown when the events per user need more sessions than fit in it (each session is
followed by at least half an hour of quiet, the feature session gap). `anchored_before(now)`
ends that timeline before now, so a backlog never holds an event from the future.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

COUNTRIES = ("US", "DE", "FR", "GB", "NL", "ES", "IT", "PL", "SE", "BR", "IN", "JP")
FRAUD_COUNTRIES = ("NG", "RU", "VN", "ID", "RO", "UA")
USER_AGENTS = {
    "mobile": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
    "android": "Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/124.0 Mobile Safari/537.36",
    "desktop": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/124.0 Safari/537.36",
    "tablet": "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) Safari/605.1.15",
    "bot": "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/124.0 Safari/537.36",
}
SEARCH_WORDS = ("shoes", "jacket", "phone", "lamp", "desk", "novel", "headphones", "mug", "tent")
# A normal session: int(expovariate(1/12)) + 2 ≈ 13.5 events about 34 s apart (430 s), then
# 1900–2400 s of quiet before the user's next session: about 2,600 s of every session cycle
# are fixed, whatever the gap between sessions is stretched to.
EVENTS_PER_SESSION = 13.5
CYCLE_FIXED_S = 2600.0
# The stream is planned to end at this fraction of the timeline: ending is a sum over many
# users' cycles, so it lands close to plan, and the rest is margin. Past the timeline a user
# gets no further event at all (that bound is exact).
PLANNED_END = 0.8


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """What to generate."""

    events: int = 100_000
    users: int = 1000
    seed: int = 7
    items: int = 5000
    categories: int = 50
    candidates: int = 20
    horizon_s: float = 24 * 3600.0
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z; `produce` anchors it near now
    bot_fraction: float = 0.01
    card_tester_fraction: float = 0.01
    takeover_rate: float = 0.02
    recommendation_rate: float = 0.12
    catalog_seed: int | None = None  # a catalog from another seed (held-out evaluation)
    drift_after: int = 0  # events before the reseller pattern may start
    reseller_rate: float = 0.0  # share of ordinary sessions that resell, after drift_after

    @property
    def sessions_per_user(self) -> float:
        """How many sessions each user needs for `events`, on average (at least one)."""
        return max(1.0, self.events / max(self.users, 1) / EVENTS_PER_SESSION)

    @property
    def timeline_s(self) -> float:
        """Event time the events span at most: `horizon_s`, or longer when the sessions per
        user need it, so that their fixed part stays under half of each planned cycle.
        """
        return max(self.horizon_s, 2 * CYCLE_FIXED_S * self.sessions_per_user / PLANNED_END)

    def anchored_before(self, now_s: float) -> GeneratorConfig:
        """The same config with the timeline placed to end just before `now_s` (Unix seconds)."""
        return replace(self, start_ms=int((now_s - self.timeline_s * 1.05) * 1000))


@dataclass(frozen=True, slots=True)
class Catalog:
    """Items with their category, price and popularity inside the category."""

    category: np.ndarray
    price: np.ndarray
    by_category: list[list[int]]
    cumulative: list[list[float]]  # Zipf CDF per category, for bisect sampling
    popular: list[int]

    @classmethod
    def build(cls, config: GeneratorConfig, rng: np.random.Generator) -> Catalog:
        """A catalog of `config.items` items over `config.categories` categories."""
        category = rng.integers(0, config.categories, size=config.items)
        price = np.round(rng.lognormal(3.2, 0.9, size=config.items), 2)
        by_category, cumulative = [], []
        for cat in range(config.categories):
            members = rng.permutation(np.flatnonzero(category == cat))
            zipf = 1.0 / np.arange(1, len(members) + 1) ** 1.1
            by_category.append([int(item) for item in members])
            cumulative.append(list(np.cumsum(zipf / zipf.sum())))
        global_zipf = 1.0 / np.arange(1, config.items + 1) ** 1.1
        popular = rng.choice(
            config.items, size=200, replace=False, p=global_zipf / global_zipf.sum()
        )
        return cls(category, price, by_category, cumulative, [int(item) for item in popular])


@dataclass(slots=True)
class _User:
    index: int
    kind: str  # normal, bot, card_tester
    taste: list[float]  # CDF over categories
    country: str
    devices: list[tuple[str, str]]  # (device_id, user agent kind)
    cards: list[str]
    sessions: int = 0
    last_category: int = 0
    cart: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Session:
    """One session's fixed context and what is left of it."""

    session_id: str
    device: tuple[str, str]
    ip: str
    country: str
    remaining: int
    pattern: str = ""  # the fraud pattern this session plays, or empty
    step: int = 0
    pace_s: float = 35.0  # mean seconds between events
    browse_first: int = 0  # takeover sessions that look around before buying


class ClickstreamGenerator:
    """Yields (event, label) pairs in event-time order."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self._np = np.random.default_rng(config.seed)
        self._rng = random.Random(config.seed)
        catalog_rng = (
            self._np if config.catalog_seed is None else np.random.default_rng(config.catalog_seed)
        )
        self.catalog = Catalog.build(config, catalog_rng)
        self._category = [int(cat) for cat in self.catalog.category]
        self._price = [float(price) for price in self.catalog.price]
        self._users = [self._make_user(i) for i in range(config.users)]
        self._emitted = 0

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Events and their labels, ordered by event time, until `config.events` are out."""
        cfg = self.config
        timeline = cfg.timeline_s
        cycle = timeline * PLANNED_END / cfg.sessions_per_user
        self._mean_gap_s = cycle - CYCLE_FIXED_S
        heap: list[tuple[float, int, _Session | None]] = [
            (self._rng.uniform(0, self._mean_gap_s), user.index, None) for user in self._users
        ]
        heapq.heapify(heap)
        while self._emitted < cfg.events and heap:
            now_s, index, session = heapq.heappop(heap)
            if now_s > timeline:
                continue  # this user's timeline is over; the others go on
            user = self._users[index]
            if session is None:
                session = self._start_session(user)
            event, label = self._next_event(user, session, now_s)
            self._emitted += 1
            yield event, label
            session.remaining -= 1
            session.step += 1
            if session.remaining > 0:
                heapq.heappush(heap, (now_s + self._intra_gap(user, session), index, session))
            else:
                user.cart.clear()
                gap = self._rng.expovariate(1.0 / self._mean_gap_s) + self._rng.uniform(1900, 2400)
                heapq.heappush(heap, (now_s + gap, index, None))

    # -- users and sessions -------------------------------------------------------------------

    def _make_user(self, index: int) -> _User:
        roll = self._rng.random()
        kind = "normal"
        if roll < self.config.bot_fraction:
            kind = "bot"
        elif roll < self.config.bot_fraction + self.config.card_tester_fraction:
            kind = "card_tester"
        taste = list(np.cumsum(self._np.dirichlet(np.full(self.config.categories, 0.08))))
        country = self._rng.choice(COUNTRIES)
        device_kinds = self._rng.sample(["mobile", "android", "desktop", "tablet"], k=2)
        devices = [(f"d{index:06d}-{n}", kinds) for n, kinds in enumerate(device_kinds)]
        devices = devices[: self._rng.choice((1, 1, 2))]
        cards = [self._card(index, n) for n in range(self._rng.choice((1, 1, 2)))]
        return _User(index, kind, taste, country, devices, cards)

    def _card(self, index: int, n: int) -> str:
        return f"{self._rng.getrandbits(64):016x}{index:06d}{n}"

    def _start_session(self, user: _User) -> _Session:
        user.sessions += 1
        session_id = f"s{user.index:06d}-{user.sessions}"
        ip = f"10.{user.index % 250}.{(user.index // 250) % 250}.{self._rng.randint(1, 20)}"
        device = self._rng.choice(user.devices)
        country = user.country
        length = int(self._rng.expovariate(1 / 12.0)) + 2
        if user.kind == "bot":
            # Only some bots admit to a headless agent; their pace varies too.
            agent = "bot" if self._rng.random() < 0.35 else device[1]
            pace = self._rng.uniform(0.4, 4.0)
            return _Session(session_id, (device[0], agent), ip, country, length * 6, "bot", 0, pace)
        if user.kind == "card_tester":
            length = self._rng.randint(6, 30)
            pace = self._rng.uniform(2.0, 20.0)
            return _Session(session_id, device, ip, country, length, "card_testing", 0, pace)
        if self._rng.random() < self.config.takeover_rate:
            device = (
                f"x{self._rng.getrandbits(40):010x}",
                self._rng.choice(["desktop", "android"]),
            )
            octets = (
                self._rng.randint(0, 255),
                self._rng.randint(0, 255),
                self._rng.randint(1, 254),
            )
            ip = "203.{}.{}.{}".format(*octets)
            pool = FRAUD_COUNTRIES if self._rng.random() < 0.7 else COUNTRIES
            country = self._rng.choice(pool)
            browse = self._rng.choice((0, 0, 1, 2, 3))
            length = self._rng.randint(3, 6) + browse
            return _Session(
                session_id, device, ip, country, length, "account_takeover", 0, 12.0, browse
            )
        if (
            self.config.reseller_rate
            and self._emitted >= self.config.drift_after
            and self._rng.random() < self.config.reseller_rate
        ):
            return _Session(session_id, device, ip, country, self._rng.randint(2, 4), "reseller")
        pace = 4.0 if self._rng.random() < 0.05 else 35.0  # some people click fast
        if self._rng.random() < 0.03:  # legitimate travel or a new phone: novelty that is not fraud
            country = self._rng.choice(COUNTRIES + FRAUD_COUNTRIES[:1])
            device = (f"n{self._rng.getrandbits(40):010x}", device[1])
            user.devices.append(device)
        return _Session(session_id, device, ip, country, length, "", 0, pace)

    def _intra_gap(self, user: _User, session: _Session) -> float:
        return self._rng.expovariate(1 / session.pace_s) + (1.0 if not session.pattern else 0.1)

    # -- events -------------------------------------------------------------------------------

    def _next_event(
        self, user: _User, session: _Session, now_s: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        event = self._base_event(user, session, now_s)
        if session.pattern == "bot":
            self._bot_event(event)
        elif session.pattern == "card_testing":
            self._card_test_event(user, session, event)
        elif session.pattern == "account_takeover":
            self._takeover_event(user, session, event)
        elif session.pattern == "reseller":
            self._reseller_event(user, session, event)
        else:
            self._normal_event(user, session, event)
        label = {
            "event_id": event["event_id"],
            "is_fraud": bool(session.pattern),
            "pattern": session.pattern,
        }
        return event, label

    def _base_event(self, user: _User, session: _Session, now_s: float) -> dict[str, Any]:
        return {
            "event_id": f"e{self.config.seed}-{self._emitted:09d}",
            "user_id": f"u{user.index:06d}",
            "session_id": session.session_id,
            "event_time": self.config.start_ms + int(now_s * 1000),
            "event_type": "page_view",
            "item_id": None,
            "category_id": None,
            "price": None,
            "quantity": None,
            "currency": None,
            "search_query": None,
            "device_id": session.device[0],
            "ip": session.ip,
            "country": session.country,
            "user_agent": USER_AGENTS[session.device[1]],
            "payment_amount": None,
            "payment_method": None,
            "card_fingerprint": None,
            "billing_country": None,
            "candidates": [],
        }

    def _normal_event(self, user: _User, session: _Session, event: dict[str, Any]) -> None:
        if session.step == 0 and self._rng.random() < 0.35:
            event["event_type"] = "login"
            return
        roll = self._rng.random()
        if user.cart and roll < 0.18:
            new_card = self._rng.random() < 0.03  # people do get new cards
            self._checkout(user, session, event, new_card=new_card)
        elif roll < 0.22:
            event["event_type"] = "search"
            event["search_query"] = self._rng.choice(SEARCH_WORDS)
        elif roll < 0.22 + self.config.recommendation_rate:
            event["candidates"] = self._candidates(user)
        else:
            item = self._taste_item(user)
            self._view(event, item)
            if self._rng.random() < 0.15:
                event["event_type"] = "add_to_cart"
                event["quantity"] = self._rng.choice((1, 1, 1, 2, 3))
                user.cart.append(item)

    def _checkout(
        self, user: _User, session: _Session, event: dict[str, Any], new_card: bool
    ) -> None:
        amount = sum(self._price[item] for item in user.cart)
        event["event_type"] = (
            "purchase" if session.step % 2 or self._rng.random() < 0.6 else ("begin_checkout")
        )
        event["payment_amount"] = round(amount, 2)
        event["currency"] = "EUR"
        event["payment_method"] = self._rng.choice(
            ("card", "card", "card", "wallet", "buy_now_pay_later")
        )
        card = self._card(user.index, 9) if new_card else self._rng.choice(user.cards)
        event["card_fingerprint"] = card
        if new_card and not session.pattern:
            user.cards.append(card)
        event["billing_country"] = user.country
        if event["event_type"] == "purchase":
            user.cart.clear()

    def _view(self, event: dict[str, Any], item: int) -> None:
        event["event_type"] = "product_view"
        event["item_id"] = int(item)
        event["category_id"] = self._category[item]
        event["price"] = self._price[item]

    def _taste_item(self, user: _User) -> int:
        if self._rng.random() < 0.6:
            cat = user.last_category
        else:
            cat = min(bisect(user.taste, self._rng.random()), self.config.categories - 1)
            user.last_category = cat
        members = self.catalog.by_category[cat]
        if not members:
            return self._rng.randrange(self.config.items)
        index = bisect(self.catalog.cumulative[cat], self._rng.random())
        return members[min(index, len(members) - 1)]

    def _candidates(self, user: _User) -> list[int]:
        wanted = self.config.candidates
        picks: set[int] = set()
        while len(picks) < wanted // 2:
            picks.add(self._taste_item(user))
        while len(picks) < wanted:
            picks.add(int(self._rng.choice(self.catalog.popular)))
        out = list(picks)
        self._rng.shuffle(out)
        return out

    def _bot_event(self, event: dict[str, Any]) -> None:
        self._view(event, self._rng.randrange(self.config.items))

    def _card_test_event(self, user: _User, session: _Session, event: dict[str, Any]) -> None:
        if self._rng.random() < 0.2:  # testers also look around
            self._view(event, self._taste_item(user))
            return
        event["event_type"] = "purchase" if self._rng.random() < 0.7 else "add_payment_method"
        event["payment_amount"] = round(self._rng.uniform(0.5, 12.0), 2)
        event["currency"] = "EUR"
        event["payment_method"] = "card"
        reuse = user.cards and self._rng.random() < 0.25
        card = user.cards[-1] if reuse else self._card(user.index, 8)
        user.cards.append(card)
        event["card_fingerprint"] = card
        event["billing_country"] = self._rng.choice(COUNTRIES + FRAUD_COUNTRIES)

    def _takeover_event(self, user: _User, session: _Session, event: dict[str, Any]) -> None:
        if session.step == 0:
            event["event_type"] = "login"
        elif session.step <= session.browse_first:
            self._view(event, self._rng.choice(self.catalog.popular))
        elif session.step == session.browse_first + 1 and self._rng.random() < 0.5:
            event["event_type"] = "change_address"
        else:
            item = int(self._rng.choice(self.catalog.popular))
            user.cart = [item] * self._rng.randint(3, 12)
            self._checkout(user, session, event, new_card=True)
            event["event_type"] = "purchase"
            event["billing_country"] = session.country
            event["payment_method"] = "card"

    def _reseller_event(self, user: _User, session: _Session, event: dict[str, Any]) -> None:
        item = int(self._rng.choice(self.catalog.popular[:20]))
        quantity = self._rng.randint(8, 30)
        user.cart = [item] * quantity
        self._checkout(user, session, event, new_card=False)
        event["event_type"] = "purchase"
        event["payment_method"] = "card"
        event["item_id"] = item
        event["category_id"] = self._category[item]
        event["price"] = self._price[item]
        event["quantity"] = quantity


def generate(config: GeneratorConfig) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Shorthand for iterating a ClickstreamGenerator."""
    return iter(ClickstreamGenerator(config))
