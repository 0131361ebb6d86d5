"""Find decoder blocks and target linear layers without architecture-specific paths.

Decoder blocks are the modules whose class name is in ``model._no_split_modules`` (the
classes HF keeps whole when sharding) and that sit in an ``nn.ModuleList``; targets are
the ``nn.Linear`` modules inside those blocks, filtered by ``targets`` / ``ignore`` regexes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from rocketlm.errors import UnsupportedModelError  # noqa: F401  (re-exported)




@dataclass(frozen=True)
class DecoderStructure:
    """Blocks in execution order (name, module) and, per block, its target linears (full names)."""

    blocks_name: str
    blocks: tuple[tuple[str, nn.Module], ...]
    targets: tuple[tuple[str, ...], ...]

    @property
    def all_targets(self) -> tuple[str, ...]:
        return tuple(name for block in self.targets for name in block)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the decoder blocks, and its qualified name."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not block_classes:
        raise UnsupportedModelError(
            f"{type(model).__name__} declares no _no_split_modules, so its decoder blocks cannot be found; "
            "rocketlm supports HuggingFace causal LMs (Llama, Qwen2/3, Mistral, Gemma3, ...)")
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                type(child).__name__ in block_classes for child in module):
            candidates.append((name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"no nn.ModuleList of decoder blocks ({', '.join(sorted(block_classes))}) found in {type(model).__name__}")
    return max(candidates, key=lambda item: len(item[1]))


def decoder_structure(model: nn.Module, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> DecoderStructure:
    """Blocks and their target linears. ``targets``/``ignore`` are regexes searched in full module names."""
    blocks_name, blocks = find_decoder_blocks(model)
    target_res = [re.compile(p) for p in targets]
    ignore_res = [re.compile(p) for p in ignore]
    named_blocks, per_block = [], []
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        names = []
        for sub_name, module in block.named_modules():
            full = f"{prefix}.{sub_name}"
            if not isinstance(module, nn.Linear) or not sub_name:
                continue
            if target_res and not any(r.search(full) for r in target_res):
                continue
            if any(r.search(full) for r in ignore_res):
                continue
            names.append(full)
        named_blocks.append((prefix, block))
        per_block.append(tuple(names))
    if not any(per_block):
        raise UnsupportedModelError(
            f"no target nn.Linear layers found in the decoder blocks of {type(model).__name__} "
            f"(targets={list(targets)}, ignore={list(ignore)}); check the --targets/--ignore patterns")
    return DecoderStructure(blocks_name, tuple(named_blocks), tuple(per_block))
