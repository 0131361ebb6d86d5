import pytest
import torch

from conftest import make_tiny_model
from rocketlm.models.discovery import UnsupportedModelError, decoder_structure


def test_discovery_finds_every_decoder_linear_and_honours_patterns(tiny_arch):
    model = make_tiny_model(tiny_arch)
    structure = decoder_structure(model)
    assert len(structure.blocks) == 2
    leafs = sorted({n.rsplit(".", 1)[1] for n in structure.all_targets})
    assert leafs == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not any("lm_head" in n or "embed" in n for n in structure.all_targets)
    only_mlp = decoder_structure(model, targets=(r"mlp\.",), ignore=(r"down_proj",))
    assert {n.rsplit(".", 1)[1] for n in only_mlp.all_targets} == {"gate_proj", "up_proj"}


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="_no_split_modules"):
        decoder_structure(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = make_tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="no target"):
        decoder_structure(model, targets=("nothing_matches",))
