"""The time loops' chunks of rows on torch's OpenMP threads (backend/openmp_team.py): the team
runs every task once, on its own threads, and raises what a task raised; the PyTorch bridge
hands its loops to it while torch has a pool, with results identical to the bit to the loops
on one thread."""
import os
import sys
import threading

import pytest

torch = pytest.importorskip("torch")

import rnndsl.torch as rt  # noqa: E402
from rnndsl.backend import row_threads  # noqa: E402
from rnndsl.backend.openmp_team import loaded_team  # noqa: E402
from rnndsl.torch import RNN  # noqa: E402

TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


@pytest.fixture
def team():
    if not (sys.platform.startswith("linux") and OPENMP):
        pytest.skip("torch's threads are OpenMP's on Linux builds; here they are not")
    found = loaded_team(TORCH_LIB)
    assert found is not None, f"torch runs on OpenMP but no runtime is loaded from {TORCH_LIB}"
    return found


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_nothing_is_found_where_no_runtime_was_loaded(tmp_path):
    assert loaded_team(str(tmp_path)) is None


def test_each_task_runs_once_on_the_team_s_threads(team):
    python_threads = {t.native_id for t in threading.enumerate()}
    for _ in range(3):
        ran = []  # (task, the OS thread it ran on)
        team.run([lambda k=k: ran.append((k, threading.get_native_id())) for k in range(2)])
        assert sorted(k for k, _ in ran) == [0, 1]
        by_task = dict(ran)
        assert by_task[0] == threading.get_native_id()  # the caller is the team's first thread
        assert by_task[1] != by_task[0] and by_task[1] not in python_threads


def test_a_task_s_exception_is_raised_after_the_others_ran(team):
    ran = []

    def bad():
        raise ValueError("chunk 0 failed")

    with pytest.raises(ValueError, match="chunk 0 failed"):
        team.run([bad, lambda: ran.append(1), lambda: ran.append(2)])
    assert sorted(ran) == [1, 2]


def test_loops_on_routes_this_thread_s_chunks_and_is_undone():
    calls = []

    def run(tasks):
        calls.append(len(tasks))
        for task in tasks:
            task()

    before = row_threads.loop_threads()
    with row_threads.loops_on(run, 3):
        assert row_threads.loop_threads() == 3
        elsewhere = []
        worker = threading.Thread(target=lambda: elsewhere.append(row_threads.loop_threads()))
        worker.start()
        worker.join()
        assert elsewhere == [before]  # another thread's loops are its own
        hits = []

        class Kernel:  # compiled already, as the generated kernels are after their first call
            overloads = {"compiled": None}

            def __call__(self, T, b0, b1):
                hits.append((b0, b1))

        row_threads.run_rows(Kernel(), 5, [(0, 4), (4, 8)], ())
        assert calls == [2] and sorted(hits) == [(0, 4), (4, 8)]
    assert row_threads.loop_threads() == before


def _training_step(model, x, lengths):
    model.zero_grad()
    x.grad = None
    y = model(x, lengths=lengths)[0]
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("spec", ["lstm", "gru", "peephole_lstm"])
def test_the_bridge_runs_its_loops_on_torch_s_team_with_the_same_results(
        team, torch_threads, monkeypatch, spec):
    torch.manual_seed(0)
    model = RNN(spec, 12, 10, 2, bidirectional=True)
    x = torch.randn(9, 16, 12, requires_grad=True)
    lengths = torch.tensor([9, 5, 7, 0, 9, 3, 9, 9, 1, 2, 9, 8, 9, 4, 6, 9])
    runs = []

    def spy(tasks):
        runs.append(len(tasks))
        team.run(tasks)

    _training_step(model, x, lengths)  # compiles the kernels (a first call runs on one thread)
    monkeypatch.setattr(rt, "_torch_team", lambda: type("Spy", (), {"run": staticmethod(spy)})())
    on_team = _training_step(model, x, lengths)
    # 2 layers x 2 directions, forward and backward, each split for torch's 2 threads
    assert runs == [2] * 8
    monkeypatch.setattr(rt, "_torch_team", lambda: None)  # the loops on the calling thread alone
    alone = _training_step(model, x, lengths)
    assert all(torch.equal(a, b) for a, b in zip(on_team, alone))


def test_the_bridge_keeps_to_one_thread_when_torch_has_one(team, monkeypatch):
    runs = []
    monkeypatch.setattr(rt, "_torch_team",
                        lambda: type("Spy", (), {"run": staticmethod(runs.append)})())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        RNN("lstm", 12, 10)(torch.randn(5, 16, 12))
    finally:
        torch.set_num_threads(before)
    assert runs == []
