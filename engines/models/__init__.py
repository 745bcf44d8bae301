"""Torch modules of the fraud and ranking models."""

from torch import nn

from engines.models.fraud import FraudModel
from engines.models.ranking import RankingModel, RankingServing, map_item_ids

__all__ = ["FraudModel", "RankingModel", "RankingServing", "for_serving", "map_item_ids"]


def for_serving(module: nn.Module) -> nn.Module:
    """The module that is exported and served for a trained `module` (same outputs)."""
    if isinstance(module, RankingModel):
        return RankingServing(module).eval()
    return module
