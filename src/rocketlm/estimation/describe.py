"""What a run would process, read from the model's config alone (no weights).

The model is built on the meta device, so :func:`rocketlm.models.discovery.decoder_structure`
gives the real target layers and their shapes. The Gram groups (layers reading the same input
share one Gram) are found as calibration finds them: on a one-block copy of the model
(:func:`probe_model`, real layer shapes, random weights) whose block runs once with the
calibration hooks.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rocketlm.calibration.grams import GramAccumulator, block_kwargs, first_block_inputs
from rocketlm.errors import ModelLoadError
from rocketlm.models.discovery import DecoderStructure, decoder_structure

log = logging.getLogger(__name__)

# The probe model's vocabulary: the embedding and lm_head are timed on a slice of the real one.
PROBE_VOCAB = 4096


@dataclass(frozen=True)
class LayerShape:
    """One target layer: its block, shape and Gram group (a block-qualified name)."""

    name: str
    block: int
    d_in: int
    d_out: int
    group: str


@dataclass(frozen=True)
class ModelDescription:
    """The figures of a model that the stages' costs depend on."""

    source: str
    model_type: str
    dtype: str  # the dtype the model would be loaded in
    n_params: int  # unique parameters and buffers (tied tensors once)
    n_blocks: int
    hidden_size: int
    vocab_size: int
    attention_width: int  # heads x head dim (the attention score work per token and key)
    block_params: int  # linear parameters of the first decoder block
    block_outputs: int  # summed output widths of one block's linears (activations per token)
    max_input: int  # widest linear input of a block (the float64 copy the Gram update makes)
    layers: tuple[LayerShape, ...]

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def groups(self) -> dict[str, tuple[int, int]]:
        """Gram group -> (block, d_in), in model order."""
        return {layer.group: (layer.block, layer.d_in) for layer in self.layers}

    def block_gram_bytes(self, block: int) -> int:
        """Bytes of one block's float64 Grams."""
        return sum(8 * d * d for b, d in self.groups().values() if b == block)

    def _block_group_widths(self) -> list[list[int]]:
        widths: dict[int, list[int]] = {}
        for block, d_in in self.groups().values():
            widths.setdefault(block, []).append(d_in)
        return list(widths.values())

    def dense_inputs_bytes(self, tokens: int) -> int:
        """The most bytes one block's dense inputs take in ``--sequential --upstream-correction`` for ``tokens``
        calibration tokens (:func:`rocketlm.calibration.sequential.dense_inputs_bytes` of the block's groups)."""
        from rocketlm.calibration.sequential import dense_inputs_bytes
        return max(dense_inputs_bytes(tokens, self.dtype_bytes, w) for w in self._block_group_widths())

    def kept_dense_inputs_bytes(self, tokens: int, max_stored_bytes: int) -> int:
        """The most bytes of dense inputs the pass can keep for one block: it keeps those of the block's groups that
        hold a compressed layer when they fit in ``max_stored_bytes``, so when all of a block's do not fit, a block
        where the allocation left some groups dense may still keep the rest (the largest such subset counts)."""
        from rocketlm.calibration.sequential import dense_inputs_bytes
        kept = 0
        for widths in self._block_group_widths():
            sums = {0}  # summed widths of the subsets that fit (a subset sum: no enumeration of 2^groups subsets)
            for width in widths:
                sums |= {w + width for w in sums if dense_inputs_bytes(tokens, self.dtype_bytes, [w + width])
                         <= max_stored_bytes}
            kept = max(kept, dense_inputs_bytes(tokens, self.dtype_bytes, [max(sums)]))
        return kept

    def shapes(self) -> list[tuple[int, int]]:
        """Distinct (d_in, d_out) of the target layers, in order of appearance."""
        return list(dict.fromkeys((layer.d_in, layer.d_out) for layer in self.layers))


def read_config(model: str):
    """The HF config of a MODEL argument: a hub id, a model directory, a ``config.json`` file, a
    ``.gguf`` file or a preset. Raises :class:`ModelLoadError` when it cannot be read."""
    from transformers import AutoConfig

    from rocketlm.models.loading import check_causal_lm, resolve_source

    path = Path(model)
    try:
        if path.is_file() and path.suffix == ".json":
            config = AutoConfig.from_pretrained(str(path))
        else:
            source = resolve_source(model)
            config = AutoConfig.from_pretrained(
                source.name_or_path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of {model}: {exc}") from exc
    check_causal_lm(config, model)
    return config


def load_dtype(config, dtype: str | None) -> str:
    """The dtype ``load_model`` would give: ``dtype`` if set, else the config's, else float32."""
    if dtype:
        return dtype
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value if isinstance(value, str) and hasattr(torch, value) else "float32"


def meta_model(config, dtype: str):
    """The model on the meta device (no memory, no initialisation)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def _one_block_config(config, vocab: int):
    """A copy of ``config`` with one decoder block (per-layer lists cut to their first entry) and
    ``vocab`` tokens."""
    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    text.num_hidden_layers = 1
    for name in ("layer_types", "mlp_only_layers"):
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) > 1:
            setattr(text, name, list(value[:1]))
    text.vocab_size = vocab
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = getattr(text, name, None)
        if isinstance(token, int) and token >= vocab:
            setattr(text, name, 0)
    return small


def probe_model(config, dtype: str, device: str | torch.device):
    """A one-block model with the real layer shapes and random weights, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    small = _one_block_config(config, min(PROBE_VOCAB, config.get_text_config().vocab_size))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small, dtype=getattr(torch, dtype))
    return model.to(device).eval()


@dataclass
class Probe:
    """The one-block model the kernels are timed on, its structure and its Gram groups
    (relative layer name -> relative group name, e.g. ``self_attn.k_proj -> self_attn.q_proj``)."""

    model: torch.nn.Module
    structure: DecoderStructure
    partition: dict[str, str]

    @property
    def block(self) -> torch.nn.Module:
        return self.structure.blocks[0][1]


@torch.no_grad()
def gram_partition(model, structure: DecoderStructure) -> dict[str, str]:
    """Which linears of the first block read the same tensor: one forward with the calibration hooks."""
    prefix = structure.blocks[0][0] + "."
    modules = dict(model.named_modules())
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 8), device=next(model.parameters()).device)
    kwargs = block_kwargs(model, structure, ids)[0]
    hidden = first_block_inputs(model, structure, [ids])[0]
    accumulator = GramAccumulator({name: modules[name] for name in structure.targets[0]})
    try:
        structure.blocks[0][1](hidden, **kwargs)
    finally:
        accumulator.remove()
    return {name.removeprefix(prefix): group.removeprefix(prefix)
            for name, group in accumulator.result.group_of.items()}


def make_probe(config, dtype: str, device: str | torch.device) -> Probe:
    model = probe_model(config, dtype, device)
    structure = decoder_structure(model)
    return Probe(model, structure, gram_partition(model, structure))


def _layers(meta, structure: DecoderStructure, partition: dict[str, str]) -> tuple[LayerShape, ...]:
    modules = dict(meta.named_modules())
    layers = []
    for b, ((prefix, _), names) in enumerate(zip(structure.blocks, structure.targets)):
        for name in names:
            relative = name.removeprefix(prefix + ".")
            group = f"{prefix}.{partition.get(relative, relative)}"
            layers.append(LayerShape(name, b, modules[name].in_features, modules[name].out_features, group))
    return tuple(layers)


def _attention_width(text_config) -> int:
    heads = getattr(text_config, "num_attention_heads", 1) or 1
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads * head_dim


def describe_model(model: str, config, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                   dtype: str | None = None, device: str | torch.device = "cpu") -> tuple[ModelDescription, Probe]:
    """The :class:`ModelDescription` of MODEL (``config``: its HF config) and the :class:`Probe` to time."""
    dtype = load_dtype(config, dtype)
    meta = meta_model(config, dtype)
    structure = decoder_structure(meta, targets, ignore)
    probe = make_probe(config, dtype, device)
    unique = {id(t): t.numel() for t in (*meta.parameters(), *meta.buffers())}
    linears = [m for m in structure.blocks[0][1].modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config()
    description = ModelDescription(
        source=model, model_type=getattr(config, "model_type", "?"), dtype=dtype, n_params=sum(unique.values()),
        n_blocks=len(structure.blocks), hidden_size=text.hidden_size, vocab_size=text.vocab_size,
        attention_width=_attention_width(text), block_params=sum(m.in_features * m.out_features for m in linears),
        block_outputs=sum(m.out_features for m in linears), max_input=max(m.in_features for m in linears),
        layers=_layers(meta, structure, probe.partition))
    log.info("%s: %d blocks, %d target layers, %d Gram groups, %.2fB parameters (%s)", model, description.n_blocks,
             len(description.layers), len(description.groups()), description.n_params / 1e9, dtype)
    return description, probe
