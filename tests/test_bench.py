"""rnndsl.bench.Turns, the benchmarks' timer: every function warmed up when handed over, then
each timed once a round, each timed call right after an untimed one of the same function,
and each median from its own calls (a fake clock makes the times exact)."""
from rnndsl import bench
from rnndsl.bench import Turns


def test_turns_alternate_and_keep_each_function_s_times(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def costing(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    turns = Turns()
    fast = turns(costing("fast", 1.0), warmup=2)
    slow = turns(costing("slow", 3.0))
    assert calls == ["fast", "fast", "slow"]  # the warm-ups, as each is handed over
    calls.clear()
    turns.run(3)
    assert calls == ["fast", "fast", "slow", "slow"] * 3  # an untimed call, then a timed one
    assert (turns.median(fast), turns.median(slow)) == (1.0, 3.0)
