"""The feature contract: columns found by name, and a hash that covers each computation's
version.
"""

import numpy as np
import pytest

from pipeline.serve import spec
from tests.pipeline.columnar import featurised
from tests.pipeline.sample import NOW_MS, click_record


def test_the_kernel_writes_each_feature_to_the_column_of_its_name():
    _, _, features = featurised(
        click_record(event_id="a", device_id="d1", card_fingerprint="c1"),
        click_record(event_id="b", device_id="d2", card_fingerprint="c1", event_time=NOW_MS + 1),
        click_record(
            event_id="c",
            device_id="d2",
            card_fingerprint="c2",
            event_time=NOW_MS + 2,
            country="FR",
            billing_country="DE",
        ),
    )

    def column(name):
        return features.numeric[:, spec.numeric_column(name)].tolist()

    assert column("first_event_of_user") == [1.0, 0.0, 0.0]
    assert column("new_device") == [0.0, 1.0, 0.0]  # the first event has nothing to compare
    assert column("new_card") == [0.0, 0.0, 1.0]
    assert column("distinct_devices_1h") == [1.0, 2.0, 2.0]
    assert column("distinct_cards_1h") == [1.0, 1.0, 2.0]
    assert column("distinct_ips_1h") == [1.0, 1.0, 1.0]
    assert column("distinct_countries_1h") == [1.0, 1.0, 2.0]
    assert column("billing_country_mismatch") == [0.0, 0.0, 1.0]
    assert column("session_events_log") == pytest.approx(np.log1p([1, 2, 3]).tolist())


def test_the_hash_changes_with_a_computations_version(monkeypatch):
    before = spec.feature_hash()
    bumped = spec.FRAUD_NUMERIC_VERSIONS | {"category_affinity": 2}
    monkeypatch.setattr(spec, "FRAUD_NUMERIC_VERSIONS", bumped)
    assert spec.feature_hash() != before


def test_an_unknown_feature_name_is_refused():
    with pytest.raises(KeyError, match="no numeric feature named 'nope'"):
        spec.numeric_column("nope")
