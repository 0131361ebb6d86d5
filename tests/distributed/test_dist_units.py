"""Single-process parts of rocketlm.distributed: work assignment, the one-process context, and a
single-process run resuming from the profile shards of an interrupted multi-process run."""
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.distributed import SINGLE, DistContext, DistributedError, init_from_env
from rocketlm.distributed.assign import balance, batch_share, factor_cost, profile_cost
from rocketlm.errors import RocketError
from rocketlm.pipeline import compress

SMOL_LAYER = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536),
              "up": (576, 1536), "down": (1536, 576)}


def test_balance_packs_by_cost_not_round_robin():
    costs = {"big": 10.0, "a": 4.0, "b": 3.0, "c": 3.0}
    assert balance(costs, 2) == [["big"], ["a", "b", "c"]]  # round-robin would give 14 vs 6
    assert balance(costs, 1) == [list(costs)]
    assert balance({}, 3) == [[], [], []]
    names = {f"l{i}": float((i * 7) % 11 + 1) for i in range(40)}
    parts = balance(names, 3)
    assert sorted(n for p in parts for n in p) == sorted(names)
    loads = [sum(names[n] for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(names.values())
    assert parts == balance(names, 3)  # deterministic: every rank computes the same split


def test_smollm2_layers_split_evenly_over_two_ranks():
    grid = GridConfig.parse("removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    costs = {f"{b}.{n}": profile_cost(*shape, grid) for b in range(30) for n, shape in SMOL_LAYER.items()}
    assert costs["0.down"] > costs["0.q"] > costs["0.k"]
    loads = [sum(costs[n] for n in part) for part in balance(costs, 2)]
    assert max(loads) / min(loads) < 1.01
    assert factor_cost(576, 1536, 300, 100) > factor_cost(576, 192, 100, 40)


def test_batch_share_gives_whole_batches_and_says_when_too_few():
    shares = [batch_share(10, 4, r, 2) for r in range(2)]
    assert shares == [(0, 4), (4, 10)]  # batches [0:4] | [4:8], [8:10]
    shares = [batch_share(256, 4, r, 3) for r in range(3)]
    assert shares[0][0] == 0 and shares[-1][1] == 256 and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert all(start % 4 == 0 for start, _ in shares)
    with pytest.raises(ConfigError, match="calib-batch-size"):
        batch_share(8, 4, 0, 3)


def test_single_process_context_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") is SINGLE and SINGLE.is_main and not SINGLE.distributed
    assert SINGLE.on_main(lambda: 3, "x") == 3 and SINGLE.on_main_first(lambda: 4, "x") == 4
    assert SINGLE.all_gather(5) == [5] and SINGLE.gather_to_main(6) == [6] and SINGLE.broadcast(7) == 7
    with pytest.raises(KeyError), SINGLE.step("x"):
        raise KeyError("own errors pass through unchanged")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu") is SINGLE
    assert issubclass(DistributedError, RocketError)
    assert str(DistContext(rank=1, world_size=2, local_rank=1).device("cuda")) == "cuda:1"
    assert str(DistContext(rank=1, world_size=2, local_rank=1).device("cuda:0")) == "cuda:0"


def test_single_process_resumes_from_an_interrupted_multi_process_run(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 400}" for i in range(6000)))
    config = RocketConfig(model="tiny", removed_ratio=0.3, calib_files=(str(calib),), calib_samples=8, calib_seq_len=32,
                          grid=GridConfig((0.1, 0.3, 0.5), (1.0, 2.0)))
    tok, cache = make_tiny_tokenizer(), tmp_path / "cache"
    first = compress(make_tiny_model("llama"), tok, config, cache_dir=cache, progress=False)
    store = tmp_path / "cache" / "profiles" / first.keys.profile
    lines = (store / "layers.jsonl").read_text().splitlines()
    # as a killed 2-process run leaves it: a few layers in the store, the rest in per-rank shards (one torn line)
    (store / "layers.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (store / "layers.rank0.jsonl").write_text("\n".join(lines[3:6]) + "\n")
    (store / "layers.rank1.jsonl").write_text("\n".join(lines[6:9]) + "\n" + lines[9][:50])
    again = compress(make_tiny_model("llama"), tok, config, cache_dir=cache, progress=False)
    assert not list(store.glob("layers.rank*.jsonl"))
    merged = (store / "layers.jsonl").read_text().splitlines()
    assert merged[:9] == lines[:9] and len(merged) == len(lines)  # 9 recovered, only the rest profiled again
    assert again.allocation.choices == first.allocation.choices
