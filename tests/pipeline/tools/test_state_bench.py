"""The state bench runs end to end on the real broker (a smoke run: no timing asserted)."""

import pytest

from pipeline.kafka.admin import admin_client
from pipeline.tools.state_bench import run_state_bench

pytestmark = pytest.mark.integration


def test_state_bench_restores_every_record_and_measures_memory(kafka_settings):
    admin = admin_client(kafka_settings)
    before = set(admin.list_topics(timeout=30).topics)
    result = run_state_bench(kafka_settings, users=2000)
    # Its input and changelog are gone again (runs used to leave them: 49 runs, 8 GB).
    left = set(admin.list_topics(timeout=30).topics) - before
    assert not [topic for topic in left if topic.startswith("state-bench-")]
    assert result.users == 2000
    assert result.record_bytes > 8 * result.history_length  # the history is in it
    assert 0 < result.bytes_per_user_restored == result.bytes_per_user_live  # one form now
    assert result.restore_records_per_s > 0
    assert result.read_through_records_per_s > 0  # it checks that every record was read
    assert result.snapshot_restore_records_per_s > 0  # it checks that every user came back
    assert result.snapshot_bytes > 2000 * result.record_bytes  # the values, keys and offsets
