"""Model roles in the registry: a challenger never serves as `latest` until promoted."""

import json
import os
import shutil
from pathlib import Path

import pytest

from engines.base import EngineError
from engines.registry import (
    CHALLENGER,
    MANIFEST,
    next_version_dir,
    promote,
    resolve,
    versions,
    write_manifest,
)
from tests.engines.publish import publish_copy


@pytest.fixture
def models(tmp_path, model_dir):
    copy = tmp_path / "models"
    shutil.copytree(model_dir, copy)
    return copy


def make_challenger(models):
    version = publish_copy(models, "fraud")
    manifest_path = models / "fraud" / version / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"role": CHALLENGER}))
    return version


def test_a_challenger_is_not_latest_and_still_takes_a_version_number(models):
    champion = resolve(models, "fraud").version
    challenger = make_challenger(models)
    assert resolve(models, "fraud").version == champion
    assert versions(models, "fraud", role=CHALLENGER) == [challenger]
    assert resolve(models, "fraud", challenger).manifest["role"] == CHALLENGER
    version, _ = next_version_dir(models, "fraud")
    assert int(version) == int(challenger) + 1


def test_promotion_makes_it_the_newest_champion_with_its_record(models):
    challenger = make_challenger(models)
    promoted = promote(models, "fraud", challenger, {"reason": "by hand"})
    assert resolve(models, "fraud").version == challenger == promoted.version
    manifest = json.loads((models / "fraud" / challenger / MANIFEST).read_text())
    assert manifest["role"] == "champion" and manifest["promotion"] == {"reason": "by hand"}
    assert not list((models / "fraud" / challenger).glob(".*"))  # no staged file left
    with pytest.raises(EngineError, match="not a challenger"):
        promote(models, "fraud", challenger, {})


@pytest.mark.parametrize("partial", [b"", b'{"version": "', b"\xff\xfe", b"[]"])
def test_a_version_counts_only_once_its_manifest_is_whole(models, partial):
    # What a reader sees while a writer that does not rename (a hand copy, say) is still
    # writing the manifest: the version does not count yet, and nothing fails.
    champion = resolve(models, "fraud").version
    version, path = next_version_dir(models, "fraud")
    shutil.copytree(models / "fraud" / champion, path, dirs_exist_ok=True)
    (path / MANIFEST).write_bytes(partial)
    assert versions(models, "fraud", role=None)[-1] == champion
    assert resolve(models, "fraud").version == champion
    manifest = resolve(models, "fraud").manifest | {"version": version}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert resolve(models, "fraud").version == version


def test_the_manifest_is_written_whole_or_not_at_all(models, monkeypatch):
    version, path = next_version_dir(models, "fraud")
    original = os.replace
    seen = []

    def replace(source, target):  # what a reader finds just before the rename
        seen.append((Path(target).exists(), json.loads(Path(source).read_text())))
        original(source, target)

    monkeypatch.setattr(os, "replace", replace)
    write_manifest(path, {"version": version, "role": CHALLENGER})
    assert seen == [(False, {"version": version, "role": CHALLENGER})]
    assert versions(models, "fraud", role=CHALLENGER) == [version]
    assert [p.name for p in path.iterdir()] == [MANIFEST]  # no staged file left
