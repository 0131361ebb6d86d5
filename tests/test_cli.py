import json

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from rocketlm.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny-model"
    make_tiny_model("qwen3").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_compress_prints_what_the_sequential_pass_ran(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROCKETLM_DATA", str(data_dir))
    out = tmp_path / "ckpt"
    assert main(["compress", str(tiny_dir), "--ratio", "0.25", "--cost", "weight", "--out", str(out),
                 "--calib-samples", "6", "--seq-len", "32", "--grid", "removed=0.1:0.7:0.2;ks=1,2,3",
                 "--sequential", "--sequential-samples", "4", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    assert "sequential calibration: on (upstream correction on, damping 0.1, 4 of 6 windows)" in capsys.readouterr().out
    assert json.loads((out / "rocketlm.json").read_text())["config"]["sequential_samples"] == 4


def test_cli_compress_ppl_info_export_end_to_end(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROCKETLM_DATA", str(data_dir))
    out = tmp_path / "ckpt"
    rc = main(["compress", str(tiny_dir), "--ratio", "0.25", "--cost", "weight", "--out", str(out),
               "--calib-samples", "6", "--seq-len", "32", "--grid", "removed=0.1:0.7:0.2;ks=1,2,3",
               "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target 25.00%" in printed and "model.safetensors" in printed and "alpha cap" in printed
    manifest = json.loads((out / "rocketlm.json").read_text())
    assert manifest["config"]["removed_ratio"] == 0.25 and manifest["config"]["cost"] == "weight"
    assert manifest["allocation"]["achieved_removed_ratio"] >= 0.25
    assert set(manifest["stages"]) == {"calibration", "profiling", "allocation", "compression"}

    assert main(["ppl", str(out), "--seq-len", "32", "--limit", "2", "--out", str(tmp_path / "ppl.json"), "-q"]) == 0
    compressed_ppl = json.loads((tmp_path / "ppl.json").read_text())["perplexity"]
    assert main(["ppl", str(tiny_dir), "--seq-len", "32", "--limit", "2", "--out", str(tmp_path / "dense.json"),
                 "-q"]) == 0
    assert "perplexity" in capsys.readouterr().out
    dense_ppl = json.loads((tmp_path / "dense.json").read_text())["perplexity"]
    assert compressed_ppl > 1 and dense_ppl != compressed_ppl
    # --with-dense: the dense model the checkpoint came from, on the same windows, then the checkpoint
    assert main(["ppl", str(out), "--with-dense", "--seq-len", "32", "--limit", "2", "--out",
                 str(tmp_path / "both.json"), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(dense)" in lines[0] and "(compressed)" in lines[1]
    both = json.loads((tmp_path / "both.json").read_text())
    assert [r["kind"] for r in both] == ["dense", "compressed"]
    assert both[0]["perplexity"] == pytest.approx(dense_ppl) and both[1]["perplexity"] == pytest.approx(compressed_ppl)
    assert main(["ppl", str(tiny_dir), "--with-dense", "-q"]) == 2
    assert "needs a rocketlm checkpoint" in capsys.readouterr().err

    assert main(["info", str(out), "--layers"]) == 0
    table = capsys.readouterr().out
    assert "self_attn.q_proj" in table and "err_out" in table

    dense_out = tmp_path / "dense-export"
    assert main(["export", str(out), "--out", str(dense_out)]) == 0
    assert main(["ppl", str(dense_out), "--seq-len", "32", "--limit", "2", "--out", str(tmp_path / "ppl2.json"), "-q"]) == 0
    assert json.loads((tmp_path / "ppl2.json").read_text())["perplexity"] == pytest.approx(compressed_ppl, rel=1e-4)


def test_cli_errors_are_one_clear_line(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROCKETLM_DATA", str(data_dir))
    assert main(["compress", str(tiny_dir), "--ratio", "1.2", "--out", str(tmp_path / "x")]) == 2
    assert "removed_ratio" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nope"), "--ratio", "0.2", "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not a rocketlm checkpoint" in capsys.readouterr().err
    rc = main(["compress", str(tiny_dir), "--ratio", "0.9", "--out", str(tmp_path / "x"), "--calib-samples", "4",
               "--seq-len", "16", "--grid", "removed=0.1,0.3;ks=1,2", "--cache-dir", str(tmp_path / "c"), "-q"])
    assert rc == 2
    assert "cannot be reached" in capsys.readouterr().err


def test_cli_flops_budget_generate_bench_and_runtime_info(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROCKETLM_DATA", str(data_dir))
    monkeypatch.setenv("ROCKETLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ckpt-flops"
    assert main(["compress", str(tiny_dir), "--ratio", "0.3", "--cost", "output", "--budget-count", "flops",
                 "--out", str(out), "--calib-samples", "6", "--seq-len", "32", "--grid", "removed=0.1:0.7:0.2;ks=1,2,3",
                 "-q"]) == 0
    manifest = json.loads((out / "rocketlm.json").read_text())
    assert manifest["allocation"]["achieved_removed_flops_ratio"] >= 0.3
    assert "multiply-adds per token" in capsys.readouterr().out

    assert main(["info", str(out), "--layers", "--runtime", "factored"]) == 0
    table = capsys.readouterr().out
    assert "flops/dense" in table and "factored" in table and "run time on cpu" in table

    assert main(["generate", str(out), "w1 w2 w3", "--max-new-tokens", "5", "--runtime", "factored", "-q"]) == 0
    assert "w1 w2 w3" in capsys.readouterr().out

    assert main(["bench", str(out), "--against", str(tiny_dir), "--runs", "1", "--prefill-tokens", "16",
                 "--prompt-tokens", "8", "--new-tokens", "4", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "prefill" in printed and "decode" in printed and f"vs {tiny_dir}" in printed

    assert main(["convert", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
