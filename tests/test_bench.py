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


def test_the_training_benchmark_counts_a_step_s_products_as_by_hand():
    """benchmarks/train_bench.py's product count against the LSTM's products written out: 4
    gates, each W_i @ x and W_h @ h a row, three times in a step (forward, the gradient
    through the product, the weight gradient) but the first layer's input gradient; the
    adding task's head reads the last step, one row a sequence."""
    import runpy
    from pathlib import Path

    from rnndsl.training.train import TrainConfig

    bench_module = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                      "train_bench.py"))
    T, B, I, H = 100, 32, 2, 64
    config = TrainConfig(spec="lstm", task="adding", length=T, batch=B, hidden=H, layers=2,
                         steps=3)
    mul_add = 2  # FLOP
    layer0 = 3 * mul_add * 4 * (H * I + H * H) - mul_add * 4 * H * I
    layer1 = 3 * mul_add * 4 * (H * H + H * H)
    head = 3 * mul_add * H * 1
    expected = (T * B * (layer0 + layer1) + B * head) / 1e9
    assert abs(bench_module["product_gflop"](config) - expected) < 1e-12
