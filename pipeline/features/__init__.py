"""Per-user session state, its changelog, and the features the engines read."""

from pipeline.features.spec import FRAUD_CATEGORICAL, FRAUD_NUMERIC
from pipeline.features.state import FeatureStore, StateChange, UserState
from pipeline.features.updater import (
    FeatureBatch,
    FeatureUpdater,
    compute_features,
    feature_digests,
)

__all__ = [
    "FRAUD_CATEGORICAL",
    "FRAUD_NUMERIC",
    "FeatureBatch",
    "FeatureStore",
    "FeatureUpdater",
    "StateChange",
    "UserState",
    "compute_features",
    "feature_digests",
]
