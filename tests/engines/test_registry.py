"""Model roles in the registry: a challenger never serves as `latest` until promoted."""

import json
import shutil

import pytest

from engines.base import EngineError
from engines.registry import CHALLENGER, MANIFEST, next_version_dir, promote, resolve, versions
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
