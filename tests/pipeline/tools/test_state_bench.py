"""The state bench runs end to end on the real broker (a smoke run: no timing asserted)."""

import random

import pytest

from pipeline.kafka.admin import admin_client
from pipeline.serve.state.table import UserTable
from pipeline.tools.state_bench import _fill, _measure, full_user, run_state_bench


@pytest.mark.integration
def test_state_bench_restores_every_record_and_measures_memory(kafka_settings):
    admin = admin_client(kafka_settings.kafka)
    before = set(admin.list_topics(timeout=30).topics)
    result = run_state_bench(kafka_settings, users=2000)
    # Its input and changelog are gone again (runs used to leave them: 49 runs, 8 GB).
    left = set(admin.list_topics(timeout=30).topics) - before
    assert not [topic for topic in left if topic.startswith("state-bench-")]
    assert result.users == 2000
    assert result.record_bytes > 8 * result.history_length  # the history is in it
    assert result.bytes_per_user_restored > 0 and result.bytes_per_user_live > 0
    assert result.restore_records_per_s > 0
    assert result.read_through_records_per_s > 0  # it checks that every record was read
    assert result.snapshot_restore_records_per_s > 0  # it checks that every user came back
    assert result.snapshot_bytes > 2000 * result.record_bytes  # the values, keys and offsets


def test_a_restore_sizes_the_pool_once_and_live_users_grow_it_by_doubling():
    # 30,000 users in batches of 10,000: grown as they come, the third batch doubles the
    # pool from 20,002 rows to 40,004; sized first, it holds the users and the scratch row.
    value = full_user(random.Random(1), 1_800_000_000_000, 50).to_bytes()
    records = [(f"user-{i}", value) for i in range(30_000)]
    row = UserTable(50).pool.row_bytes()
    _fill(UserTable(50), records[:100], 4)  # what a fill imports, as the bench does first
    restored, restored_unused = _measure(lambda t: _fill(t, records, 4, sized=True), 50, 30_000)
    live, live_unused = _measure(lambda t: _fill(t, records, 4), 50, 30_000)
    assert restored_unused == 0
    assert live_unused == (40_004 - 30_001) * row
    assert live - restored == pytest.approx(live_unused, rel=0.01)  # the rest is the same
