"""rnndsl.bench.Turns, the benchmarks' timer: every function warmed up when handed over, then
each timed once a round, each timed call right after untimed ones of the same function
(for at least `settle` seconds), and each median from its own calls (a fake clock makes the times exact)."""
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


def test_a_turn_calls_the_function_untimed_until_settle_seconds_have_passed(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def fn(name, seconds):
        def call():
            calls.append(name)
            clock[0] += seconds
        return call

    turns = Turns(settle=2.5)
    short = turns(fn("short", 1.0))
    long = turns(fn("long", 4.0))
    calls.clear()
    turns.run(2)
    # 1 s calls: three untimed (2.5 s reached after the third), then the timed one; a 4 s
    # call passes `settle` at once: one untimed call
    assert calls == ["short"] * 4 + ["long"] * 2 + ["short"] * 4 + ["long"] * 2
    assert (turns.median(short), turns.median(long)) == (1.0, 4.0)
