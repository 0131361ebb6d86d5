"""Bad inputs answer before the model is loaded, in one line, and nothing is written."""
from __future__ import annotations

import pytest

from rocketlm.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any check lets the run reach the model load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr("rocketlm.models.loading.load_model", refuse)


def _compress(*extra: str) -> list[str]:
    return ["compress", "smollm2-135m", "--ratio", "0.5", *extra]


def test_unreachable_ratio_is_reported_before_loading(no_model_load, data_dir, tmp_path, capsys):
    assert main(_compress("--ratio", "0.95", "--data", str(data_dir), "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "0.95 cannot be reached" in err and "0.7" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_is_reported_before_loading(no_model_load, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROCKETLM_DATA", raising=False)
    assert main(_compress("--out", str(tmp_path / "o"))) == 2
    assert "no data directory" in capsys.readouterr().err
    assert main(_compress("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))) == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_or_missing_calibration_file(no_model_load, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(_compress("--calib", str(empty), "--out", str(tmp_path / "o"))) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(_compress("--calib", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "o"))) == 2
    assert "does not exist" in capsys.readouterr().err


def test_output_dir_rules(no_model_load, data_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(_compress("--data", str(data_dir), "--out", str(other))) == 2
    assert "not a rocketlm checkpoint" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "rocketlm.json").write_text("{}")
    assert main(_compress("--data", str(data_dir), "--out", str(earlier))) == 2
    assert "--overwrite" in capsys.readouterr().err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(_compress("--data", str(data_dir), "--out", str(a_file / "sub"))) == 2
    assert "is a file" in capsys.readouterr().err


def test_encoder_decoder_model_is_refused_by_name(data_dir, tmp_path, capsys):
    from transformers import T5Config
    T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    assert main(["compress", str(tmp_path / "t5"), "--ratio", "0.2", "--calib-samples", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "o"), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "'t5'" in err and "encoder-decoder" in err and "causal" in err


def test_every_user_error_derives_from_rocket_error():
    import rocketlm.errors as errors
    from rocketlm.allocation.knapsack import InfeasibleBudgetError
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 12
    assert all(issubclass(c, errors.RocketError) for c in classes + [InfeasibleBudgetError])


def test_one_process_options_are_refused_under_several_processes():
    from rocketlm.config import RocketConfig
    from rocketlm.errors import ConfigError
    from rocketlm.preflight import check_processes
    for options in ({"sequential": True}, {"sequential": True, "upstream_correction": True}):
        config = RocketConfig(removed_ratio=0.5, **options)
        check_processes(config, world_size=1)
        with pytest.raises(ConfigError, match="one process only"):
            check_processes(config, world_size=2)
    check_processes(RocketConfig(removed_ratio=0.5), world_size=2)
    check_processes(RocketConfig(removed_ratio=0.5, refine_iters=2, cost="fisher"), world_size=2)  # layer-parallel
