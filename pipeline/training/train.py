"""`streamscore train`: generate clickstream, compute features as the pipeline does, train,
validate on the later part of the timeline, export to ONNX and write a versioned model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines import metrics
from engines.base import EngineError
from engines.drift import Profile
from engines.models import FraudModel, RankingModel, for_serving, map_item_ids
from engines.models.ranking import FIRST_ID
from engines.registry import (
    CHALLENGER,
    ModelArtifact,
    next_version_dir,
    resolve,
    write_manifest,
)
from pipeline.monitor import quality
from pipeline.serve import spec as feature_spec
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import compute_features
from pipeline.serve.records import FeatureBatch
from pipeline.settings import DecisionSettings
from pipeline.training.export import OPSET, export_onnx
from pipeline.training.generator import ClickstreamGenerator, GeneratorConfig

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """What to train on and how long."""

    events: int = 200_000
    users: int = 2000
    seed: int = 7
    history_length: int = 50
    candidates: int = 50
    session_gap_s: float = 1800.0
    validation_fraction: float = 0.2
    max_epochs: int = 12
    patience: int = 2
    batch_size: int = 512
    negatives: int = 31
    catalog_seed: int | None = None  # evaluation: new users and sessions, training's catalog


@dataclass(frozen=True, slots=True)
class Dataset:
    """Generated events, their features and labels, split by time at `split`."""

    events: list[ClickEvent]
    labels: np.ndarray
    features: FeatureBatch
    split: int
    items: int
    categories: int
    item_categories: np.ndarray
    fingerprint: str


def build_dataset(config: TrainConfig) -> Dataset:
    """Generate and featurise; the same generator and updater the pipeline uses."""
    generator = ClickstreamGenerator(
        GeneratorConfig(
            events=config.events,
            users=config.users,
            seed=config.seed,
            catalog_seed=config.catalog_seed,
        )
    )
    events, labels = [], []
    digest = hashlib.sha256()
    for record, label in generator:
        events.append(ClickEvent(**record))
        labels.append(label["is_fraud"])
        digest.update(record["event_id"].encode())
    features = compute_features(
        events, config.history_length, config.session_gap_s, all_histories=True
    )
    item_categories = np.zeros(generator.config.items + FIRST_ID, dtype=np.int64)
    item_categories[FIRST_ID:] = generator.catalog.category + FIRST_ID
    digest.update(json.dumps(asdict(generator.config)).encode())
    return Dataset(
        events=events,
        labels=np.asarray(labels, dtype=np.float32),
        features=features,
        split=int(len(events) * (1 - config.validation_fraction)),
        items=generator.config.items,
        categories=generator.config.categories,
        item_categories=item_categories,
        fingerprint=digest.hexdigest()[:16],
    )


# -- fraud ------------------------------------------------------------------------------------


def train_fraud(
    data: Dataset, config: TrainConfig, progress: Progress, start: FraudModel | None = None
) -> tuple[FraudModel, dict[str, float], np.ndarray]:
    """Train the fraud model with early stopping on validation loss, then calibrate; return
    it with its validation report and scores. From `start` (a champion's weights), it is
    fine-tuned instead: its input normalisation is kept, so what it learnt of the patterns
    missing from `data` is not thrown away, at a third of the learning rate.
    """
    torch.manual_seed(config.seed)
    numeric = torch.from_numpy(data.features.numeric)
    categorical = torch.from_numpy(data.features.categorical)
    labels = torch.from_numpy(data.labels)
    train, valid = slice(0, data.split), slice(data.split, None)
    cardinalities = [
        feature_spec.CATEGORICAL_CARDINALITY[n] for n in feature_spec.FRAUD_CATEGORICAL
    ]
    if start is None:
        model = FraudModel(numeric.shape[1], cardinalities)
        model.fit_normalisation(numeric[train])
        rate = 3e-3
    else:
        model, rate = start, 1e-3
    optimiser = torch.optim.Adam(model.parameters(), lr=rate, weight_decay=1e-5)
    loss_fn = nn.BCEWithLogitsLoss()

    def validation_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model.logits(numeric[valid], categorical[valid]), labels[valid]))

    def epoch(rng: np.random.Generator) -> None:
        for rows in _batches(data.split, config.batch_size, rng):
            index = torch.from_numpy(rows)
            loss = loss_fn(model.logits(numeric[index], categorical[index]), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    _fit(model, epoch, validation_loss, config, progress, "fraud")
    with torch.no_grad():
        _calibrate(model, model.logits(numeric[valid], categorical[valid]), labels[valid])
        model.refresh_baseline()
        scores, _ = model(numeric[valid], categorical[valid])
    return model, fraud_metrics(data.labels[data.split :], scores.numpy()), scores.numpy()


def fraud_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The fraud quality report."""
    return {
        "pr_auc": metrics.pr_auc(labels, scores),
        "roc_auc": metrics.roc_auc(labels, scores),
        "recall_at_1pct_fpr": metrics.recall_at_fpr(labels, scores, 0.01),
        "brier": metrics.brier(labels, scores),
        "positive_rate": float(labels.mean()),
    }


def _calibrate(model: FraudModel, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Temperature scaling on held-out logits."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=50)
    loss_fn = nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss: torch.Tensor = loss_fn(logits / log_t.exp(), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimiser.step(closure)  # type: ignore[no-untyped-call]
    model.temperature.copy_(log_t.detach().exp())


# -- ranking ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RankingExamples:
    """Product views with a non-empty prior history: (history, next item) pairs."""

    history_items: np.ndarray
    history_categories: np.ndarray
    target: np.ndarray
    train_rows: np.ndarray
    valid_rows: np.ndarray


def ranking_examples(data: Dataset) -> RankingExamples:
    """Every product view whose user already has history, split by time."""
    views = np.array(
        [
            i
            for i, e in enumerate(data.events)
            if e.event_type == "product_view" and e.item_id is not None
        ]
    )
    views = views[data.features.history_items[views, -1] >= 0]
    hist_items = map_item_ids(data.features.history_items[views], data.items)
    hist_cats = map_item_ids(data.features.history_categories[views], data.categories)
    target = map_item_ids(np.array([data.events[i].item_id for i in views]), data.items)
    is_train = views < data.split
    return RankingExamples(
        hist_items, hist_cats, target, np.flatnonzero(is_train), np.flatnonzero(~is_train)
    )


def train_ranking(
    data: Dataset, config: TrainConfig, progress: Progress
) -> tuple[RankingModel, dict[str, Any]]:
    """Sampled-softmax training against popularity-sampled negatives; early stopping."""
    torch.manual_seed(config.seed)
    examples = ranking_examples(data)
    popularity, sampling = popularity_of(examples, data.items)
    model = RankingModel(
        data.items + FIRST_ID,
        data.categories + FIRST_ID,
        torch.from_numpy(data.item_categories),
        config.history_length,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(config.seed)
    eval_candidates = evaluation_candidates(examples, sampling, config.candidates, config.seed)

    def scores_of(rows: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        scores: torch.Tensor = model(
            torch.from_numpy(examples.history_items[rows]),
            torch.from_numpy(examples.history_categories[rows]),
            torch.from_numpy(candidates),
        )
        return scores

    def epoch(epoch_rng: np.random.Generator) -> None:
        for batch in _batches(len(examples.train_rows), config.batch_size, epoch_rng):
            rows = examples.train_rows[batch]
            negatives = rng.choice(len(sampling), size=(len(rows), config.negatives), p=sampling)
            candidates = np.concatenate([examples.target[rows, None], negatives], axis=1)
            logits = scores_of(rows, candidates)
            loss = nn.functional.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long))
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()

    def validation_loss() -> float:
        with torch.no_grad():
            scores = scores_of(examples.valid_rows, eval_candidates)
        return -metrics.ranking_metrics(metrics.rank_of_first(scores.numpy()))["ndcg_at_10"]

    _fit(model, epoch, validation_loss, config, progress, "ranking")
    with torch.no_grad():
        model_scores = scores_of(examples.valid_rows, eval_candidates).numpy()
    return model, ranking_report(model_scores, popularity, eval_candidates, config.seed)


def popularity_of(examples: RankingExamples, items: int) -> tuple[np.ndarray, np.ndarray]:
    """Training-split view counts per item row, and the negative-sampling distribution."""
    popularity = np.bincount(examples.target[examples.train_rows], minlength=items + FIRST_ID)
    sampling = (popularity + 1.0) ** 0.75
    sampling[:FIRST_ID] = 0
    return popularity, sampling / sampling.sum()


def ranking_report(
    model_scores: np.ndarray, popularity: np.ndarray, candidates: np.ndarray, seed: int
) -> dict[str, Any]:
    """NDCG@10, HitRate@10 and MRR of the model and of popularity and random baselines."""
    report: dict[str, Any] = metrics.ranking_metrics(metrics.rank_of_first(model_scores))
    random_scores = np.random.default_rng(seed + 1).random(candidates.shape)
    report["baselines"] = {
        "popularity": metrics.ranking_metrics(
            metrics.rank_of_first(popularity[candidates].astype(float))
        ),
        "random": metrics.ranking_metrics(metrics.rank_of_first(random_scores)),
    }
    return report


def evaluation_candidates(
    examples: RankingExamples, sampling: np.ndarray, count: int, seed: int
) -> np.ndarray:
    """The true next item in column 0, then popularity-sampled negatives."""
    rng = np.random.default_rng(seed + 2)
    negatives = rng.choice(len(sampling), size=(len(examples.valid_rows), count - 1), p=sampling)
    return np.concatenate([examples.target[examples.valid_rows, None], negatives], axis=1)


# -- shared -----------------------------------------------------------------------------------


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n, size):
        yield order[start : start + size]


def _fit(
    model: nn.Module,
    epoch: Callable[[np.random.Generator], None],
    validation_loss: Callable[[], float],
    config: TrainConfig,
    progress: Progress,
    name: str,
) -> None:
    """Epochs until validation stops improving for `patience` epochs; keeps the best weights."""
    rng = np.random.default_rng(config.seed)
    best, best_state, stale = float("inf"), None, 0
    for number in range(config.max_epochs):
        model.train()
        epoch(rng)
        model.eval()
        loss = validation_loss()
        progress(name, number + 1, config.max_epochs)
        if loss < best - 1e-5:
            best, stale = loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()


def save_model(
    model_dir: Path,
    name: str,
    module: nn.Module,
    example: dict[str, torch.Tensor],
    outputs: list[str],
    config: dict[str, Any],
    extra: dict[str, Any],
) -> Path:
    """Write weights, ONNX and the manifest as the next version of `name`."""
    version, path = next_version_dir(model_dir, name)
    torch.save(module.state_dict(), path / "weights.pt")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    onnx_sha = export_onnx(for_serving(module), example, outputs, path / "model.onnx")
    manifest = {
        "name": name,
        "version": version,
        "architecture": type(module).__name__,
        "config": config,
        "inputs": {
            key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": ["batch", *t.shape[1:]]}
            for key, t in example.items()
        },
        "outputs": outputs,
        "opset": OPSET,
        "onnx_sha256": onnx_sha,
    } | extra
    write_manifest(path, manifest)
    return path


def needs_training(model_dir: Path) -> bool:
    """True when a model is missing or its newest version was trained on other features."""
    current = feature_spec.feature_hash()
    for name in ("fraud", "ranking"):
        try:
            artifact = resolve(model_dir, name)
        except EngineError:
            return True
        if artifact.manifest.get("feature_hash") != current:
            return True
        if name == "fraud" and "drift" not in artifact.manifest:  # trained before the monitor
            return True
    return False


def save_fraud(
    model_dir: Path,
    data: Dataset,
    fraud: FraudModel,
    report: dict[str, float],
    validation_scores: np.ndarray,
    extra: dict[str, Any],
) -> Path:
    """Save a trained fraud model as the next version, with what the monitor compares the
    served population and the online quality with: the drift profile of its training
    inputs and validation scores, and its validation tally.
    """
    names = list(feature_spec.FRAUD_NUMERIC) + list(feature_spec.FRAUD_CATEGORICAL)
    train = slice(0, data.split)
    profile = Profile.fit(
        names,
        data.features.numeric[train],
        data.features.categorical[train],
        [feature_spec.CATEGORICAL_CARDINALITY[n] for n in feature_spec.FRAUD_CATEGORICAL],
        validation_scores,
    )
    validation = quality.tally(
        validation_scores, data.labels[data.split :] > 0.5, DecisionSettings()
    )
    return save_model(
        model_dir,
        "fraud",
        fraud,
        {
            "numeric": torch.from_numpy(data.features.numeric[:4]),
            "categorical": torch.from_numpy(data.features.categorical[:4]),
        },
        ["score", "contributions"],
        {
            "numeric": fraud.numeric,
            "cardinalities": [e.num_embeddings for e in fraud.embeddings],
            "embedding_dim": fraud.embedding_dim,
        },
        extra
        | {
            "features": names,
            "metrics": report,
            "drift": profile.to_manifest(),
            "validation": validation.to_json(),
        },
    )


def retrain_fraud(
    model_dir: Path,
    events: list[ClickEvent],
    labels: np.ndarray,
    config: TrainConfig,
    progress: Progress,
    source: dict[str, Any],
    start: ModelArtifact | None = None,
) -> tuple[Path, dict[str, float]]:
    """Train a fraud challenger on labelled events read back from the topics (in event
    time order; the later `validation_fraction` validates) and save it as the next version
    in the challenger role; `source` says what it was trained on. With `start` (the
    champion), it is fine-tuned from that version's weights.
    """
    features = compute_features(events, config.history_length, config.session_gap_s)
    digest = hashlib.sha256("".join(e.event_id for e in events).encode()).hexdigest()[:16]
    data = Dataset(
        events=events,
        labels=labels.astype(np.float32),
        features=features,
        split=int(len(events) * (1 - config.validation_fraction)),
        items=0,
        categories=0,
        item_categories=np.zeros(0, dtype=np.int64),
        fingerprint=digest,
    )
    initial = None
    if start is not None:
        from engines.torch import build_module

        if start.manifest.get("feature_hash") != feature_spec.feature_hash():
            raise EngineError(
                f"fraud v{start.version} was trained on other features: it cannot be "
                "fine-tuned on today's; train from scratch"
            )
        module = build_module(start)
        assert isinstance(module, FraudModel), start.manifest["architecture"]
        initial = module
    fraud, report, validation_scores = train_fraud(data, config, progress, initial)
    extra = {
        "feature_hash": feature_spec.feature_hash(),
        "training_data": digest,
        "train_config": asdict(config),
        "role": CHALLENGER,
        "trained_on": source | ({} if start is None else {"fine_tuned_from": start.version}),
    }
    return save_fraud(model_dir, data, fraud, report, validation_scores, extra), report


def train_all(model_dir: Path, config: TrainConfig, progress: Progress) -> dict[str, Any]:
    """Train, evaluate and save both models; return their metrics."""
    data = build_dataset(config)
    common = {
        "feature_hash": feature_spec.feature_hash(),
        "training_data": data.fingerprint,
        "train_config": asdict(config),
    }
    fraud, fraud_report, validation_scores = train_fraud(data, config, progress)
    save_fraud(model_dir, data, fraud, fraud_report, validation_scores, common)
    ranking, ranking_report = train_ranking(data, config, progress)
    shape = (4, config.history_length)
    save_model(
        model_dir,
        "ranking",
        ranking,
        {
            "history_items": torch.ones(shape, dtype=torch.int64),
            "history_categories": torch.ones(shape, dtype=torch.int64),
            "candidate_items": torch.ones((4, config.candidates), dtype=torch.int64),
        },
        ["scores"],
        {
            "items": data.items + FIRST_ID,
            "categories": data.categories + FIRST_ID,
            "history_length": config.history_length,
        },
        common
        | {
            "item_vocabulary": data.items,
            "category_vocabulary": data.categories,
            "candidates": config.candidates,
            "metrics": ranking_report,
        },
    )
    return {"fraud": fraud_report, "ranking": ranking_report}
