import pytest
import torch

from conftest import make_tiny_tokenizer
from rocketlm.calibration.data import DataError, read_documents, sample_windows, tokenize_corpus


def test_windows_are_seeded(tmp_path):
    ids = torch.arange(1000)
    a = sample_windows(ids, 5, 16, seed=1)
    assert torch.equal(a, sample_windows(ids, 5, 16, seed=1))
    assert not torch.equal(a, sample_windows(ids, 5, 16, seed=2))
    assert a.shape == (5, 16) and bool(((a[:, 1:] - a[:, :-1]) == 1).all())
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(torch.arange(10), 2, 16, seed=0)


def test_documents_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text('<doc id="1">\nfirst w1 w2\n</doc>\n<doc id="2">\nsecond\n</doc>\n')
    assert read_documents(txt) == ["first w1 w2", "second"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "w3 w4"}\n\n{"text": "w5"}\n')
    assert read_documents(jsonl) == ["w3 w4", "w5"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="text"):
        read_documents(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    ids = tokenize_corpus(make_tiny_tokenizer(), (str(txt), str(jsonl)))
    assert ids.dtype == torch.int64 and ids.numel() >= 6
