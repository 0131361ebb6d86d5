"""rocketlm: training-free compression of causal LMs with ROCKET and ROCKET-ActCost.

Public verbs::

    import rocketlm
    model, tokenizer = rocketlm.load_model("smollm2-135m")
    result = rocketlm.compress(model, tokenizer, rocketlm.RocketConfig(removed_ratio=0.3, cost="output"))
    rocketlm.save_compressed(result, "runs/smol-30")
    model, tokenizer = rocketlm.load_compressed("runs/smol-30")

A checkpoint is also a transformers model directory: after ``import rocketlm``,
``AutoModelForCausalLM.from_pretrained("runs/smol-30")`` rebuilds the compressed model (the
``rocket`` quantization method, registered by :mod:`rocketlm.integration`).
"""
from rocketlm.checkpoint.io import convert_checkpoint, densify, load_compressed, read_manifest, save_compressed
from rocketlm.config import GridConfig, RocketConfig
from rocketlm.integration import install as _install_transformers_integration
from rocketlm.models.loading import load_model
from rocketlm.pipeline import CompressionResult, compress

_install_transformers_integration()

__all__ = ["GridConfig", "RocketConfig", "CompressionResult", "compress", "convert_checkpoint", "densify",
           "load_compressed", "load_model", "read_manifest", "save_compressed"]
__version__ = "0.1.0"
