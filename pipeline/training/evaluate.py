"""`streamscore evaluate`: model quality on held-out generated data, as served (ONNX Runtime).

The held-out set has users and sessions the models never saw (another seed) over the
training catalog (the manifest's training seed), so item embeddings still mean something.
Fraud is scored on every held-out event; ranking uses the later 20% of the held-out timeline,
with popularity counted on its first 80%.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from engines import metrics
from engines.base import Engine
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import resolve
from pipeline.training.train import (
    TrainConfig,
    build_dataset,
    evaluation_candidates,
    fraud_metrics,
    popularity_of,
    ranking_examples,
    ranking_report,
)

EVALUATION_SEED = 101
CHUNK = 4096


def evaluate(
    model_dir: Path,
    out_dir: Path,
    fraud_version: str = "latest",
    ranking_version: str = "latest",
    events: int = 60_000,
    users: int = 600,
) -> dict[str, Any]:
    """Metrics of both models on held-out data; PNG plots are written to `out_dir`."""
    fraud_artifact = resolve(model_dir, "fraud", fraud_version)
    ranking_artifact = resolve(model_dir, "ranking", ranking_version)
    trained = TrainConfig(**fraud_artifact.manifest["train_config"])
    config = replace(
        trained, events=events, users=users, seed=EVALUATION_SEED, catalog_seed=trained.seed
    )
    data = build_dataset(config)

    fraud = OnnxRuntimeEngine(fraud_artifact)
    scores = np.concatenate(
        [
            fraud.infer(
                {
                    "numeric": data.features.numeric[i : i + CHUNK],
                    "categorical": data.features.categorical[i : i + CHUNK],
                }
            )["score"]
            for i in range(0, len(data.events), CHUNK)
        ]
    )
    fraud.close()

    examples = ranking_examples(data)
    popularity, sampling = popularity_of(examples, data.items)
    candidates = evaluation_candidates(examples, sampling, config.candidates, config.seed)
    ranking = OnnxRuntimeEngine(ranking_artifact)
    rows = examples.valid_rows
    model_scores = _rank(
        ranking, examples.history_items[rows], examples.history_categories[rows], candidates
    )
    ranking.close()

    report = {
        "fraud": fraud_metrics(data.labels, scores),
        "ranking": ranking_report(model_scores, popularity, candidates, config.seed),
        "models": {"fraud": fraud_artifact.version, "ranking": ranking_artifact.version},
        "held_out": {
            "events": len(data.events),
            "ranking_queries": len(rows),
            "seed": EVALUATION_SEED,
        },
    }
    plot(report, data.labels, scores, out_dir)
    return report


def _rank(
    engine: Engine, history: np.ndarray, categories: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Scores per candidate; all inputs are embedding rows already (see map_item_ids)."""
    parts = [
        engine.infer(
            {
                "history_items": history[i : i + CHUNK],
                "history_categories": categories[i : i + CHUNK],
                "candidate_items": candidates[i : i + CHUNK],
            }
        )["scores"]
        for i in range(0, len(candidates), CHUNK)
    ]
    return np.concatenate(parts)


def plot(
    report: dict[str, Any], labels: np.ndarray, scores: np.ndarray, out_dir: Path
) -> list[Path]:
    """PR curve, calibration, and ranking metrics against the baselines, as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        out_dir / "fraud_pr_curve.png",
        out_dir / "fraud_calibration.png",
        out_dir / "ranking_vs_baselines.png",
    ]

    precision, recall = metrics.precision_recall_curve(labels, scores)
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(recall, precision)
    axis.set(
        xlabel="recall",
        ylabel="precision",
        title=f"fraud PR curve (PR-AUC {report['fraud']['pr_auc']:.3f})",
    )
    figure.tight_layout()
    figure.savefig(written[0], dpi=100)
    plt.close(figure)

    predicted, observed, counts = metrics.calibration_bins(labels, scores, bins=10)
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    axis.plot(predicted[counts > 0], observed[counts > 0], marker="o", label="model")
    axis.set(
        xlabel="mean predicted probability",
        ylabel="observed fraud rate",
        title=f"fraud calibration (Brier {report['fraud']['brier']:.4f})",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(written[1], dpi=100)
    plt.close(figure)

    names = ["ndcg_at_10", "hitrate_at_10", "mrr"]
    systems = {"model": report["ranking"], **report["ranking"]["baselines"]}
    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(systems)
    for i, (system, values) in enumerate(systems.items()):
        axis.bar(np.arange(len(names)) + i * width, [values[n] for n in names], width, label=system)
    axis.set_xticks(np.arange(len(names)) + width, names)
    axis.set(ylabel="score", title="ranking on held-out sessions")
    axis.legend()
    figure.tight_layout()
    figure.savefig(written[2], dpi=100)
    plt.close(figure)
    return written
