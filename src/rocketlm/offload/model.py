"""An offloaded model: built on the meta device, weights read from safetensors one block at a time.

* The non-block tensors (embeddings, final norm, an untied head) are loaded once; those already in
  the model's dtype on a CPU compute device are memory-mapped, not copied (only the pages read count
  in the resident set: the embedding rows of the calibration tokens).
* A decoder block's tensors are read with plain file reads (not through the mapping, so their pages
  leave the resident set with the block) when the block runs, and released afterwards; a block can be
  pinned for a stage that needs it for longer (its calibration, profiling, compression).
* After compression a block's tensors (compressed modules included) go to a per-block safetensors
  piece and the block returns to meta; the checkpoint is then streamed from the pieces. The compression
  stage keeps the pieces in the cache (``compressed/<key>/``), so an interrupted run resumes there.
"""
from __future__ import annotations

import contextlib
import json
import os
import logging
import struct
from pathlib import Path

import torch
from torch import nn

from rocketlm.errors import ModelLoadError

log = logging.getLogger(__name__)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_header(path: str | Path) -> tuple[dict, int]:
    """``({name: {dtype, shape, data_offsets}}, data_start)`` of a safetensors file."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class TensorSource:
    """Where one stored tensor lies: file, byte range, dtype and shape."""

    __slots__ = ("path", "start", "end", "dtype", "shape")

    def __init__(self, path: Path, start: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.start, self.end, self.dtype, self.shape = path, start, end, dtype, shape

    def read(self) -> torch.Tensor:
        """A fresh (anonymous-memory) copy read with ``readinto``: no page of a mapping stays resident."""
        buf = torch.empty(self.end - self.start, dtype=torch.uint8)
        if buf.numel():
            with open(self.path, "rb", buffering=0) as handle:
                handle.seek(self.start)
                view, done = memoryview(buf.numpy()), 0
                while done < buf.numel():
                    n = handle.readinto(view[done:])
                    if not n:
                        raise ModelLoadError(f"{self.path} is truncated")
                    done += n
        return buf.view(self.dtype).reshape(self.shape)

    def mapped(self) -> torch.Tensor:
        """A read-only-by-convention memory map of the tensor (copy-on-write, pages read lazily)."""
        storage = torch.UntypedStorage.from_file(str(self.path), False, self.end)
        return torch.empty(0, dtype=torch.uint8).set_(storage, self.start, (self.end - self.start,)) \
            .view(self.dtype).reshape(self.shape)


def file_sources(path: str | Path) -> dict[str, TensorSource]:
    path = Path(path)
    header, base = read_header(path)
    return {name: TensorSource(path, base + e["data_offsets"][0], base + e["data_offsets"][1], _ST_DTYPES[e["dtype"]],
                               tuple(e["shape"])) for name, e in header.items()}


def model_sources(directory: str | Path) -> dict[str, TensorSource]:
    """Every tensor of a model directory (one ``model.safetensors`` or a sharded index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{directory} has no model.safetensors: --offload disk needs safetensors weights "
                             "(convert the model with save_pretrained first)")
    sources: dict[str, TensorSource] = {}
    for name in files:
        sources.update(file_sources(directory / name))
    return sources


class OffloadedModel:
    """The sequential-onloading state attached to a meta-device model as ``model.rocketlm_offload``."""

    def __init__(self, model: nn.Module, sources: dict[str, TensorSource], device: str | torch.device = "cpu",
                 work_dir: str | Path | None = None):
        from rocketlm.models.discovery import find_decoder_blocks

        self.model = model
        self.sources = dict(sources)
        self.device = torch.device(device)
        blocks_name, blocks = find_decoder_blocks(model)
        self.prefixes = [f"{blocks_name}.{i}" for i in range(len(blocks))]
        self.blocks = list(blocks)
        self.resident: set[int] = set()
        self.pinned: set[int] = set()
        self._work_dir = Path(work_dir) if work_dir else None
        self._tmp = None
        self._handles = []
        self.mapped: list[str] = []  # non-block tensors held as memory maps (load_offloaded fills it)
        for b, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, a, b=b: self._before(b)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, b=b: self._after(b)))
        model.rocketlm_offload = self

    # ------------------------------------------------------------------------------------------ blocks
    def block_of(self, name: str) -> int | None:
        for b, prefix in enumerate(self.prefixes):
            if name.startswith(prefix + "."):
                return b
        return None

    def _block_state_names(self, b: int) -> list[str]:
        return [f"{self.prefixes[b]}.{k}" for k in self.blocks[b].state_dict()]

    def onload(self, b: int) -> None:
        from accelerate.utils import set_module_tensor_to_device
        if b in self.resident:
            return
        for name in self._block_state_names(b):
            meta = self.model.get_parameter(name) if _is_param(self.model, name) else self.model.get_buffer(name)
            value = self.source(name).read().to(self.device, meta.dtype)
            set_module_tensor_to_device(self.model, name, self.device, value=value)
        self.resident.add(b)

    def offload(self, b: int) -> None:
        from accelerate.utils import set_module_tensor_to_device
        if b not in self.resident:
            return
        for name in self._block_state_names(b):
            set_module_tensor_to_device(self.model, name, "meta")
        self.resident.discard(b)

    def pin(self, b: int) -> None:
        self.pinned.add(b)
        self.onload(b)

    def release(self, b: int) -> None:
        self.pinned.discard(b)
        self.offload(b)

    @contextlib.contextmanager
    def holding(self, b: int):
        self.pin(b)
        try:
            yield self.blocks[b]
        finally:
            self.release(b)

    def _before(self, b: int) -> None:
        self.onload(b)

    def _after(self, b: int) -> None:
        if b not in self.pinned:
            self.offload(b)

    def source(self, name: str) -> TensorSource:
        try:
            return self.sources[name]
        except KeyError:
            raise ModelLoadError(f"{name} is not in the model's safetensors files") from None

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            import tempfile
            self._tmp = tempfile.TemporaryDirectory(prefix="rocketlm-offload-")
            self._work_dir = Path(self._tmp.name)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def store_block(self, b: int, piece: str | Path | None = None) -> Path:
        """Write resident block ``b`` (compressed modules included) to a piece file (``piece``, default in the
        work directory; written to a temporary name and renamed, so a piece that exists is complete), point its
        sources there, and return it to meta."""
        from safetensors.torch import save_file
        state = {f"{self.prefixes[b]}.{k}": v.detach().to("cpu").contiguous()
                 for k, v in self.blocks[b].state_dict().items()}
        piece = Path(piece) if piece is not None else self.work_dir / f"block-{b:05d}.safetensors"
        partial = piece.with_name(piece.name + ".partial")
        save_file(state, str(partial))
        del state
        os.replace(partial, piece)
        self.pinned.discard(b)
        self.offload(b)
        self.adopt_piece(b, piece)
        return piece

    def adopt_piece(self, b: int, piece: str | Path) -> None:
        """Read block ``b``'s tensors from ``piece`` from now on (the block is on meta, its module structure
        already that of the piece: e.g. the compressed modules of an interrupted run, rebuilt on meta)."""
        if b in self.resident:
            raise RuntimeError(f"block {b} is resident; store or release it before adopting a piece")
        for name in [n for n in self.sources if self.block_of(n) == b]:
            del self.sources[name]
        self.sources.update(file_sources(piece))

    # ------------------------------------------------------------------------------------------ misc
    def fingerprint(self, tensor_names) -> str:
        """:func:`rocketlm.storage.model_fingerprint` of the full model, one tensor in memory at a time."""
        from rocketlm.storage import stable_hash
        config = getattr(self.model, "config", None)
        parts: list = [config.to_json_string(use_diff=False) if config is not None else type(self.model).__name__]
        tensors = dict(self.model.named_parameters())
        tensors.update(self.model.named_buffers())
        with torch.no_grad():
            for name in tensor_names:
                held = tensors[name]
                t = held if held.device.type != "meta" else self.source(name).read().to(held.dtype)
                t = t.detach().to(torch.float64)
                parts.append([name, list(t.shape), float(t.sum()), float(t.square().sum()),
                              float(t.abs().max()) if t.numel() else 0.0])
                del t
        return stable_hash(*parts)

    @contextlib.contextmanager
    def without_head(self):
        """The output head returns one logit per position: forwards that only capture block inputs
        then never read the (vocab x hidden) head nor hold (tokens x vocab) logits."""
        head = self.model.get_output_embeddings()
        if head is None:
            yield
            return
        head.forward = lambda x: x[..., :1]
        try:
            yield
        finally:
            del head.forward

    def remap(self) -> None:
        """Map the memory-mapped non-block tensors afresh, so the pages a whole-vocabulary pass read (the
        fisher cost's head gradient reads every row of a tied embedding) leave the resident set once the
        old mapping is freed; the values are unchanged."""
        from accelerate.utils import set_module_tensor_to_device
        for name in self.mapped:
            set_module_tensor_to_device(self.model, name, self.device, value=self.sources[name].mapped())
        self.model.tie_weights()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _is_param(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(module_name)._parameters


def is_offloaded(model) -> bool:
    return isinstance(getattr(model, "rocketlm_offload", None), OffloadedModel)


def load_offloaded(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                   work_dir: str | Path | None = None):
    """``(model, tokenizer)`` for a local model directory with safetensors weights, the model on the meta
    device except its non-block tensors; blocks are read from disk when they run (see :class:`OffloadedModel`)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rocketlm.models.loading import check_causal_lm

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"--offload disk needs a local model directory with config.json and safetensors "
                             f"weights; {path} is not one")
    config = AutoConfig.from_pretrained(directory)
    check_causal_lm(config, str(path))
    sources = model_sources(directory)
    torch_dtype = getattr(torch, dtype) if dtype else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.config.name_or_path = str(path)
    model.tie_weights()
    offloaded = OffloadedModel(model, sources, device, work_dir)
    device = torch.device(device)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if offloaded.block_of(name) is not None or tensor.device.type != "meta":
            continue
        if name not in sources:
            continue  # tied to a tensor already loaded (e.g. lm_head.weight -> embed_tokens.weight)
        src = sources[name]
        if device.type == "cpu" and src.dtype == tensor.dtype:
            value = src.mapped()  # stays memory-mapped: only the pages read become resident
            offloaded.mapped.append(name)
        else:
            value = src.read().to(device, tensor.dtype)
        set_module_tensor_to_device(model, name, device, value=value)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.device.type == "meta" and offloaded.block_of(n) is None
               and n not in sources]
    if missing:
        raise ModelLoadError(f"{path}: tensors {missing[:5]} are missing from the safetensors files")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def weights_bytes(directory: str | Path) -> int:
    return sum(s.end - s.start for s in model_sources(directory).values())


def resolve_offload(mode: str, model: str, device: str = "cpu", headroom: float = 0.5, processes: int = 1) -> str:
    """``disk`` or ``none`` for a requested mode. ``auto``: disk when ``model`` is a local safetensors
    directory whose weights, times the ``processes`` of this host that each load a copy, exceed ``headroom``
    x the available memory. ``cpu``: the weights stay in host
    memory; with a CPU compute device that is the in-memory path, with an accelerator the blocks are
    onloaded from the (page-cached) safetensors file, i.e. ``disk``."""
    if mode in ("none", "disk"):
        return mode
    if mode == "cpu":
        return "none" if torch.device(device).type == "cpu" else "disk"
    directory = Path(model)
    try:
        size = weights_bytes(directory) if directory.is_dir() else 0
    except ModelLoadError:
        size = 0
    choice = "disk" if size * processes > headroom * available_memory_bytes() else "none"
    log.info("offload auto: weights %.2f GB x %d process(es), available %.2f GB -> %s", size / 1e9, processes,
             available_memory_bytes() / 1e9, choice)
    return choice
