"""The metrics that are computed rather than counted: memory gauges read at scrape time,
stage histograms by label."""

from __future__ import annotations

from server.limits import MemoryBudget
from server.metrics import Metrics


def test_memory_gauges_show_the_budget_as_it_is_when_scraped() -> None:
    metrics = Metrics()
    budget = MemoryBudget(1000)
    metrics.watch_memory(budget)
    sample = metrics.registry.get_sample_value
    assert sample("pixelstream_memory_held_bytes") == 0
    assert budget.reserve(300)
    budget.charge(200)
    assert sample("pixelstream_memory_held_bytes") == 500
    budget.release(200)
    budget.unreserve(100)
    assert sample("pixelstream_memory_held_bytes") == 200
    budget.waiting = 3  # readers paused (wait_for_room counts them)
    assert sample("pixelstream_reads_paused") == 3
    assert b"pixelstream_memory_held_bytes 200.0" in metrics.render()


def test_timings_go_to_one_histogram_per_stage() -> None:
    metrics = Metrics()
    metrics.observe_timings({"decode": 20.0, "inference": 40.0})
    metrics.observe_timings({"decode": 30.0})
    sample = metrics.registry.get_sample_value
    assert sample("pixelstream_stage_seconds_count", {"stage": "decode"}) == 2
    assert sample("pixelstream_stage_seconds_sum", {"stage": "decode"}) == 0.05
    assert sample("pixelstream_stage_seconds_count", {"stage": "inference"}) == 1
    assert sample("pixelstream_stage_seconds_sum", {"stage": "inference"}) == 0.04
