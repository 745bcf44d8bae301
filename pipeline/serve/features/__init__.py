"""The features the engines read: the compiled fold over a batch (`fold`) and its readable
reference (`updater`). The per-user state they fold into lives in `pipeline.serve.state`.
"""

from pipeline.serve.features.fold import Featurizer, compute_features
from pipeline.serve.features.updater import FeatureUpdater, feature_digests

__all__ = [
    "FeatureUpdater",
    "Featurizer",
    "compute_features",
    "feature_digests",
]
