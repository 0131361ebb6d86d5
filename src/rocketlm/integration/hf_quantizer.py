"""``quant_method: "rocket"`` for transformers: ``from_pretrained`` rebuilds a compressed model.

Registered through transformers' public extension points for third-party quantization methods
(``register_quantization_config`` / ``register_quantizer``) when ``transformers.quantizers`` is
first imported after ``import rocketlm`` (see :mod:`rocketlm.integration`). Loading a checkpoint:

1. before the weights load, every layer listed in ``quantization_config["layers"]`` becomes an empty
   :class:`~rocketlm.compression.modules.SparseDictionaryLinear`, so ``U``, ``V_values``, ``V_mask``
   and ``bias`` load by name (plain safetensors, no remote code);
2. after loading, :func:`rocketlm.runtime.convert_model` turns them into the run-time form
   ``quantization_config["runtime"]`` (``auto``: the measured fastest on the model's device). Layers
   that became ``merged`` are plain ``nn.Linear`` and leave ``layers``, so ``save_pretrained`` writes
   a checkpoint that loads again to the same model.

The run-time form is chosen at load time with
``from_pretrained(path, quantization_config=RocketQuantizationConfig(runtime="factored"))``
(transformers keeps the checkpoint's layers and takes the runtime, a loading attribute, from the
argument) or, with public API only, by editing the config:
``config = AutoConfig.from_pretrained(path); config.quantization_config["runtime"] = "merged";
from_pretrained(path, config=config)``.
"""
from __future__ import annotations

import copy
import logging

from transformers.quantizers import auto as _auto
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rocketlm.config import RUNTIMES
from rocketlm.errors import CheckpointError, ConfigError
from rocketlm.integration.layers import (FORMAT_VERSION, QUANT_METHOD, check_spec, densify_layers,
                                         empty_compressed_linear, forget_layers)

log = logging.getLogger(__name__)


class RocketQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a rocketlm checkpoint: per-layer shapes and the run-time form to load into.

    ``runtime`` is one of ``auto`` (measured fastest on the device), ``compact`` (per layer the exact form with the
    fewest resident bytes), ``factored``, ``sparse``, ``packed``, ``merged`` (a dense ``nn.Linear``) or
    ``canonical`` (the stored form, for checks).
    """

    def __init__(self, layers: dict | None = None, runtime: str = "auto", format_version: int = FORMAT_VERSION,
                 **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            log.debug("ignoring unknown rocket quantization_config fields %s", sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.runtime = runtime
        self.layers = {name: check_spec(name, spec) for name, spec in copy.deepcopy(layers or {}).items()}
        self.post_init()

    def post_init(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"rocket quantization_config runtime={self.runtime!r}: choose one of "
                              f"{', '.join(RUNTIMES)}")
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format version {self.format_version!r} was written by a newer rocketlm; "
                                  f"this one reads up to {FORMAT_VERSION}: upgrade rocketlm (pip install -U rocketlm)")
        if self.format_version < FORMAT_VERSION:
            raise CheckpointError(f"rocket quantization_config format version {self.format_version} is unknown; "
                                  "the checkpoint's config.json is damaged: write it again with rocketlm")

    def get_loading_attributes(self) -> dict:
        """What a ``quantization_config`` passed to ``from_pretrained`` may change in the checkpoint's."""
        return {"runtime": self.runtime}


class RocketHfQuantizer(HfQuantizer):
    """Loads (and saves) rocketlm checkpoints; it cannot compress a dense model (use ``rocketlm.compress``)."""

    requires_calibration = True
    quantization_config: RocketQuantizationConfig

    def __init__(self, quantization_config: RocketQuantizationConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise CheckpointError("a rocket quantization_config only loads checkpoints written by rocketlm; this "
                                  "model has none. Compress it with rocketlm.compress (or `rocketlm compress`) first")
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        for name, spec in self.quantization_config.layers.items():
            empty_compressed_linear(model, name, spec)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from rocketlm.runtime import convert_model

        forms = convert_model(model, self.quantization_config.runtime)
        model.rocketlm_forms = forms
        merged = [name for name, form in forms.items() if form == "merged"]
        if merged:
            log.info("%d of %d compressed layers run merged (dense W_hat): save_pretrained writes them dense; load "
                     "with runtime='factored' to keep a compact checkpoint", len(merged), len(forms))
        forget_layers(model, merged)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every compressed layer becomes an ``nn.Linear`` holding ``W_hat``."""
        densify_layers(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "rocket"`` known to transformers (idempotent)."""
    if QUANT_METHOD not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RocketQuantizationConfig)
    if QUANT_METHOD not in _auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RocketHfQuantizer)
    # transformers applies the loading attributes of a quantization_config passed to from_pretrained
    # (here: runtime) only for the config types in this tuple; without it the argument is ignored
    loading_types = getattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(loading_types, tuple) and RocketQuantizationConfig not in loading_types:
        _auto.LOADING_ATTRIBUTES_CONFIG_TYPES = loading_types + (RocketQuantizationConfig,)


register()  # importing this module (directly or through rocketlm.integration) makes the method known
