"""rnndsl.bench.Turns, the benchmarks' timer: every function warmed up when handed over, then
each timed once a round, each timed call right after untimed ones of the same function
(for at least `settle` seconds), and each median from its own calls (a fake clock makes
the times exact); and the training benchmark's count of a step's products."""
import pytest

from rnndsl import bench
from rnndsl.bench import Turns


@pytest.fixture
def costing(monkeypatch):
    """costing(name, seconds): a function that records its name in `costing.calls` and moves
    the benchmarks' (fake) clock on by `seconds`."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def make(name, seconds):
        def fn():
            make.calls.append(name)
            clock[0] += seconds
        return fn
    make.calls = []
    return make


def test_turns_alternate_and_keep_each_function_s_times(costing):
    turns = Turns()
    fast = turns(costing("fast", 1.0), warmup=2)
    slow = turns(costing("slow", 3.0))
    assert costing.calls == ["fast", "fast", "slow"]  # the warm-ups, as each is handed over
    costing.calls.clear()
    turns.run(3)
    # one untimed call (the default `settle` is shorter than a call), then a timed one
    assert costing.calls == ["fast", "fast", "slow", "slow"] * 3
    assert (turns.median(fast), turns.median(slow)) == (1.0, 3.0)


def test_a_turn_calls_the_function_untimed_until_settle_seconds_have_passed(costing):
    turns = Turns(settle=2.5)
    short = turns(costing("short", 1.0))
    long = turns(costing("long", 4.0))
    costing.calls.clear()
    turns.run(2)
    # 1 s calls: three untimed (2.5 s reached after the third), then the timed one; a 4 s
    # call passes `settle` at once: one untimed call
    assert costing.calls == ["short"] * 4 + ["long"] * 2 + ["short"] * 4 + ["long"] * 2
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
