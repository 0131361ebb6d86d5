"""Several layers profiled at once in one process: same profiles as one at a time, bounded and lazy."""
import threading
import time

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer, tiny_rocket_config
from rocketlm.config import ConfigError
from rocketlm.pipeline import compress
from rocketlm.profiling.run import concurrent_map, profile_workers


def test_concurrent_map_runs_everything_at_most_workers_at_a_time_and_draws_lazily():
    lock, state = threading.Lock(), {"running": 0, "peak": 0, "drawn": 0}

    def items():
        for i in range(12):
            state["drawn"] += 1
            assert state["drawn"] - done_count() <= 3  # never more than `workers` drawn ahead of the consumer
            yield (i,)

    finished = []
    done_count = lambda: len(finished)  # noqa: E731

    def square(i):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(0.01)
        with lock:
            state["running"] -= 1
        return i * i

    threads = torch.get_num_threads()
    for value in concurrent_map(square, items(), workers=3):
        finished.append(value)
    assert sorted(finished) == [i * i for i in range(12)]
    assert 1 < state["peak"] <= 3
    assert torch.get_num_threads() == threads  # intra-op threads restored


def test_concurrent_map_raises_the_first_error_and_stops_drawing():
    drawn = []

    def items():
        for i in range(50):
            drawn.append(i)
            yield (i,)

    def fail_at_3(i):
        if i == 3:
            raise ValueError("layer 3 failed")
        return i

    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="layer 3 failed"):
        list(concurrent_map(fail_at_3, items(), workers=2))
    assert len(drawn) <= 6
    assert torch.get_num_threads() == threads


def test_profile_workers_rule():
    assert profile_workers(3, torch.device("cpu")) == 3
    assert profile_workers(0, torch.device("meta")) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert profile_workers(0, torch.device("cpu")) == 1
        torch.set_num_threads(2)
        assert profile_workers(0, torch.device("cpu")) == 2
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ConfigError, match="profile_workers"):
        tiny_rocket_config("x.txt", profile_workers=-1)


def test_two_workers_give_the_profiles_and_allocation_of_one(calib_file, tmp_path):
    tok = make_tiny_tokenizer()
    one = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file, profile_workers=1),
                   cache_dir=tmp_path / "one", progress=False)
    two = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file, profile_workers=2),
                   cache_dir=tmp_path / "two", progress=False)
    assert [p.name for p in two.profiles] == [p.name for p in one.profiles]
    for a, b in zip(one.profiles, two.profiles):
        assert [(c.k, c.s) for c in a.candidates] == [(c.k, c.s) for c in b.candidates]
        for ca, cb in zip(a.candidates, b.candidates):
            assert cb.error_weight == pytest.approx(ca.error_weight, rel=1e-5, abs=1e-7)
            assert cb.error_output == pytest.approx(ca.error_output, rel=1e-5, abs=1e-7)
    # the same candidate for every layer (the errors agree to float32 rounding: threads sum differently)
    pick = lambda alloc: [(c.name, c.dense, c.removed_ratio, c.ks, c.k, c.s) for c in alloc.choices]
    assert pick(two.allocation) == pick(one.allocation)
    for ca, cb in zip(one.allocation.choices, two.allocation.choices):
        assert cb.cost == pytest.approx(ca.cost, rel=1e-5, abs=1e-7)
