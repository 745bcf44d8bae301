"""Per-user state, and the store that keeps it per assigned input partition."""

from __future__ import annotations

from collections import deque

from pipeline.features.spec import WINDOWS_S

NEVER = -1
MAX_SEEN = 16  # devices, IPs, cards and countries remembered per user (oldest evicted)
MAX_SESSION_ITEMS = 64


class UserState:
    """What the updater remembers about one user. Times are event-time milliseconds."""

    __slots__ = (
        "amount_1h",
        "cards",
        "counter_time",
        "countries",
        "devices",
        "events",
        "first_seen",
        "history",
        "ips",
        "last_login",
        "last_purchase",
        "last_time",
        "purchases",
        "session_events",
        "session_items",
        "session_last",
        "session_novelty",
        "session_start",
        "session_views",
    )

    def __init__(self, now_ms: int, history_length: int) -> None:
        """Fresh state for a user first seen at `now_ms`."""
        self.first_seen = now_ms
        self.last_time = NEVER
        self.last_login = NEVER
        self.last_purchase = NEVER
        self.session_start = now_ms
        self.session_last = NEVER
        self.session_events = 0
        self.session_views = 0
        self.session_items: set[int] = set()
        self.session_novelty = [0.0, 0.0, 0.0, 0.0]  # device, ip, country, card new this session
        self.counter_time = now_ms
        self.events = [0.0] * len(WINDOWS_S)
        self.purchases = [0.0] * len(WINDOWS_S)
        self.amount_1h = 0.0
        self.devices: dict[str, int] = {}
        self.ips: dict[str, int] = {}
        self.cards: dict[str, int] = {}
        self.countries: dict[str, int] = {}
        self.history: deque[tuple[int, int]] = deque(maxlen=history_length)


class FeatureStore:
    """User states, one map per assigned partition, so a revoked partition drops cleanly."""

    def __init__(self, history_length: int) -> None:
        """An empty store; `history_length` bounds each user's recent item sequence."""
        self.history_length = history_length
        self._partitions: dict[int, dict[str, UserState]] = {}

    def get(self, partition: int, user_id: str, now_ms: int) -> UserState:
        """The state of `user_id`, created on first sight."""
        users = self._partitions.setdefault(partition, {})
        state = users.get(user_id)
        if state is None:
            state = users[user_id] = UserState(now_ms, self.history_length)
        return state

    def drop_partition(self, partition: int) -> None:
        """Forget the state of a partition this process no longer owns."""
        self._partitions.pop(partition, None)

    def users(self) -> int:
        """Users held across all partitions."""
        return sum(len(users) for users in self._partitions.values())
