"""Per-user state, partitioned like the input: the compiled user table (`table`) and its key
index (`keys`), the readable reference state (`reference`), the changelog records a stretch
writes (`changes`), restore from and to the changelog (`changelog`), local snapshots
(`snapshot`) and the keyed pseudonyms state keeps instead of personal data (`pseudonym`).
Nothing here imports the features: they fold into this state, not the other way round.
"""

from pipeline.serve.state.changes import StateChange, StateChanges
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.reference import FeatureStore, UserState
from pipeline.serve.state.table import UserTable

__all__ = [
    "FeatureStore",
    "Pseudonyms",
    "StateChange",
    "StateChanges",
    "UserState",
    "UserTable",
]
