"""Per-layer sensitivities of the model's loss to each target layer's output (for the ``fisher`` cost).

Second-order model of the loss (empirical Fisher, isotropic over a layer's output coordinates): an
output perturbation ``dY`` of layer ``l`` raises the summed token NLL by about
``1/2 sum_t (g_t . dy_t)^2 ~ 1/2 (mean_t ||g_t||^2 / d_out) ||dY||^2``, with ``g_t`` the gradient of the
summed NLL with respect to the layer's output at token ``t``. A candidate with relative output error
``e_o = ||dY|| / ||Y||`` therefore costs about ``sensitivity * e_o^2`` nats per token, with

    sensitivity = 1/2 * (mean_t ||g_t||^2 / d_out) * mean_t ||y_t||^2.

One forward and one backward pass over the first ``samples`` calibration windows measures every layer
at once; the model's weights receive no gradient and are never changed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rocketlm.models.discovery import DecoderStructure
from rocketlm.storage import stable_hash, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    grad_sq: float  # mean over tokens of ||g_t||^2
    out_sq: float  # mean over tokens of ||y_t||^2
    d_out: int

    @property
    def sensitivity(self) -> float:
        return 0.5 * self.grad_sq / self.d_out * self.out_sq


class _Recorder:
    """Forward hooks on the target layers summing ``||y_t||^2`` and, through tensor hooks, ``||g_t||^2``."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.grad_sq = {name: 0.0 for name in modules}
        self.out_sq = {name: 0.0 for name in modules}
        self.d_out: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def forward_hook(module, args, out):
            self.d_out[name] = out.shape[-1]
            self.out_sq[name] += float(out.detach().to(torch.float64).square().sum())
            if out.requires_grad:
                out.register_hook(lambda grad: self._add_grad(name, grad))
        return forward_hook

    def _add_grad(self, name: str, grad: torch.Tensor) -> None:
        self.grad_sq[name] += float(grad.to(torch.float64).square().sum())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_sensitivities(model, structure: DecoderStructure, windows: torch.Tensor, batch_size: int = 1,
                          progress: bool = True) -> dict[str, LayerSensitivity]:
    """Sensitivity of every target layer over ``windows`` (n x seq_len token ids); weights are left untouched."""
    modules = dict(model.named_modules())
    recorder = _Recorder({name: modules[name] for name in structure.all_targets})
    flags = [(p, p.requires_grad) for p in model.parameters()]
    embed_hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_(True))
    device = next(model.parameters()).device
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in tqdm(range(0, windows.shape[0], batch_size), desc="sensitivity (windows)", disable=not progress):
                ids = windows[i: i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      ids[:, 1:].reshape(-1), reduction="sum")
                nll.backward()
                tokens += ids.numel()
    finally:
        embed_hook.remove()
        recorder.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: LayerSensitivity(recorder.grad_sq[name] / tokens, recorder.out_sq[name] / tokens,
                                   recorder.d_out[name]) for name in structure.all_targets}


def cached_sensitivities(model, structure: DecoderStructure, windows: torch.Tensor, samples: int, cache_dir: Path,
                         calibration_key: str, progress: bool = True) -> dict[str, LayerSensitivity]:
    """:func:`measure_sensitivities` on the first ``samples`` windows, cached under ``cache_dir/sensitivity``
    (keyed by the calibration key, which covers the model weights and the windows, and ``samples``)."""
    path = Path(cache_dir) / "sensitivity" / f"{stable_hash(calibration_key, samples)}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {name: LayerSensitivity(**v) for name, v in data["layers"].items()}
    result = measure_sensitivities(model, structure, windows[:samples], progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"calibration": calibration_key, "samples": samples,
                             "layers": {name: asdict(v) for name, v in result.items()}})
    return result


def attach_sensitivities(profiles, sensitivities: dict[str, LayerSensitivity]) -> None:
    """Set ``profile.sensitivity`` (read by the ``fisher`` cost) on every profile."""
    for profile in profiles:
        profile.sensitivity = sensitivities[profile.name].sensitivity
