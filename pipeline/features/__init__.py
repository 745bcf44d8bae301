"""Per-user session state and the features the engines read."""

from pipeline.features.spec import FRAUD_CATEGORICAL, FRAUD_NUMERIC
from pipeline.features.state import FeatureStore, UserState
from pipeline.features.updater import FeatureBatch, FeatureUpdater, compute_features

__all__ = [
    "FRAUD_CATEGORICAL",
    "FRAUD_NUMERIC",
    "FeatureBatch",
    "FeatureStore",
    "FeatureUpdater",
    "UserState",
    "compute_features",
]
