"""The one config object round-trips through dict/JSON (as the checkpoint stores it) and validates input."""
from __future__ import annotations

import json

import pytest

from rocketlm.config import ConfigError, GridConfig, RocketConfig, parse_values


def test_config_round_trip_through_json():
    config = RocketConfig(removed_ratio=0.3, cost="weight", budget_count="flops", alpha=1.2,
                          targets=("q_proj",), ignore=("down",), calib_files=("a.txt",), calib_samples=8,
                          grid=GridConfig(removed_ratios=(0.1, 0.3), ks=(1.0, 2.0)), runtime="factored",
                          save_dtype="bfloat16")
    again = RocketConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert RocketConfig.from_dict(RocketConfig().to_dict()) == RocketConfig()


def test_alpha_spellings():
    assert RocketConfig(alpha="off").alpha is None
    assert RocketConfig(alpha="1.5").alpha == 1.5
    with pytest.raises(ConfigError, match=">= 1"):
        RocketConfig(alpha=0.5)


@pytest.mark.parametrize("bad", [dict(removed_ratio=1.0), dict(cost="nope"), dict(budget_count="tokens"),
                                 dict(runtime="fast"), dict(calib_samples=0), dict(profile_dtype="float16")])
def test_bad_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        RocketConfig(**bad)


def test_unknown_keys_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="known keys"):
        RocketConfig.from_dict({"ratio": 0.5})


def test_grid_and_range_parsing():
    grid = GridConfig.parse("removed=0.05:0.15:0.05;ks=1,2")
    assert grid.removed_ratios == (0.05, 0.1, 0.15) and grid.ks == (1.0, 2.0)
    assert parse_values("0.2,0.5") == (0.2, 0.5)
    with pytest.raises(ConfigError, match="step"):
        parse_values("0.1:0.5:0", "--ratios")
    with pytest.raises(ConfigError, match="--ratios"):
        parse_values("a,b", "--ratios")
