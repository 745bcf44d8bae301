"""Per-user session state, its changelog, and the features the engines read."""

from pipeline.serve.features.fold import Featurizer, compute_features
from pipeline.serve.features.pseudonym import Pseudonyms
from pipeline.serve.features.spec import FRAUD_CATEGORICAL, FRAUD_NUMERIC
from pipeline.serve.features.state import FeatureStore, StateChange, UserState
from pipeline.serve.features.table import UserTable
from pipeline.serve.features.updater import FeatureBatch, FeatureUpdater, feature_digests

__all__ = [
    "FRAUD_CATEGORICAL",
    "FRAUD_NUMERIC",
    "FeatureBatch",
    "FeatureStore",
    "FeatureUpdater",
    "Featurizer",
    "Pseudonyms",
    "StateChange",
    "UserState",
    "UserTable",
    "compute_features",
    "feature_digests",
]
