import json
import time

from pipeline.serve.counts import STAGES, RunStats, StageClock


def test_a_stage_adds_its_wall_time_and_the_cpu_time_inside_it():
    clock = StageClock()
    mark = clock.start()
    deadline = time.perf_counter() + 0.02
    while time.perf_counter() < deadline:  # busy: CPU time accrues with the wall time
        pass
    wall = clock.stop("features", mark)
    assert wall >= 0.02 and clock.wall["features"] == wall
    assert 0 < clock.cpu["features"] <= wall * 1.01 + 1e-5
    assert all(clock.wall[stage] == 0.0 for stage in STAGES if stage != "features")
    clock.add("features", 1.0, 0.5)
    assert clock.wall["features"] == wall + 1.0


def test_the_report_keeps_the_stats_file_names_of_every_count_and_stage():
    stats = RunStats(consumed=3)
    stats.stages.add("decode", 0.25, 0.125)
    report = json.loads(json.dumps(stats.report()))  # what --stats-file holds
    assert report["consumed"] == 3 and report["decode_s"] == 0.25
    assert report["decode_cpu_s"] == 0.125
    assert {f"{stage}_s" for stage in STAGES} <= set(report)
    assert {f"{stage}_cpu_s" for stage in STAGES} <= set(report)
    assert "stages" not in report
