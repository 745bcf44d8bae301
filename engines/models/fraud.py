"""Fraud model: standardised numeric features plus categorical embeddings into a small MLP.

Reason codes use gradient × (input − baseline), computed in the forward pass from the ReLU
masks (one extra matmul per layer), so they ship inside the ONNX graph and cost about one
more forward pass instead of the F+1 passes of occlusion. The baseline is the training mean
(zero after standardisation) and the mean embedding of each categorical.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class FraudModel(nn.Module):
    """Inputs `numeric` (B, F) float32 and `categorical` (B, K) int64; outputs `score` (B,)
    probabilities and `contributions` (B, F + K) logit contributions.
    """

    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor
    embedding_baseline: torch.Tensor

    def __init__(
        self, numeric: int, cardinalities: list[int], embedding_dim: int = 4, hidden: int = 64
    ) -> None:
        """A model for `numeric` features and categoricals of the given vocabulary sizes."""
        super().__init__()
        self.numeric = numeric
        self.embedding_dim = embedding_dim
        self.embeddings = nn.ModuleList(nn.Embedding(n, embedding_dim) for n in cardinalities)
        width = numeric + embedding_dim * len(cardinalities)
        self.layer1 = nn.Linear(width, hidden)
        self.layer2 = nn.Linear(hidden, hidden // 2)
        self.head = nn.Linear(hidden // 2, 1)
        self.register_buffer("mean", torch.zeros(numeric))
        self.register_buffer("std", torch.ones(numeric))
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("embedding_baseline", torch.zeros(width - numeric))

    def fit_normalisation(self, numeric: torch.Tensor) -> None:
        """Set the standardisation from training rows."""
        self.mean.copy_(numeric.mean(0))
        self.std.copy_(numeric.std(0).clamp_min(1e-3))

    def refresh_baseline(self) -> None:
        """Baseline embedding of each categorical: its mean vector."""
        means = [cast(nn.Embedding, emb).weight.detach().mean(0) for emb in self.embeddings]
        self.embedding_baseline.copy_(torch.cat(means))

    def logits(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits, for training."""
        return self._forward_parts(numeric, categorical)[0]

    def forward(
        self, numeric: torch.Tensor, categorical: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated probability and per-input contributions."""
        logit, z, pre1, pre2 = self._forward_parts(numeric, categorical)
        grad = self._input_gradient(pre1, pre2)
        baseline = torch.cat([torch.zeros_like(self.mean), self.embedding_baseline])
        per_dim = grad * (z - baseline) / self.temperature
        numeric_part = per_dim[:, : self.numeric]
        categorical_part = (
            per_dim[:, self.numeric :]
            .reshape(per_dim.shape[0], len(self.embeddings), self.embedding_dim)
            .sum(-1)
        )
        contributions = torch.cat([numeric_part, categorical_part], dim=1)
        return torch.sigmoid(logit / self.temperature), contributions

    def _forward_parts(
        self, numeric: torch.Tensor, categorical: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scaled = (numeric - self.mean) / self.std
        embedded = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        z = torch.cat([scaled, *embedded], dim=1)
        pre1 = self.layer1(z)
        pre2 = self.layer2(torch.relu(pre1))
        logit = self.head(torch.relu(pre2)).squeeze(-1)
        return logit, z, pre1, pre2

    def _input_gradient(self, pre1: torch.Tensor, pre2: torch.Tensor) -> torch.Tensor:
        """D logit / d z for each row, written out for this two-hidden-layer ReLU MLP."""
        grad2 = (pre2 > 0).to(pre2.dtype) * self.head.weight  # (B, H2)
        grad1 = (grad2 @ self.layer2.weight) * (pre1 > 0).to(pre1.dtype)  # (B, H1)
        return grad1 @ self.layer1.weight  # (B, width)
