"""Torch modules of the fraud and ranking models."""

from engines.models.fraud import FraudModel
from engines.models.ranking import RankingModel, map_item_ids

__all__ = ["FraudModel", "RankingModel", "map_item_ids"]
