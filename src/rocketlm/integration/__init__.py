"""Integrations with other libraries: the ``rocket`` quantization method of transformers.

``import rocketlm`` calls :func:`install`: the method is registered at once if transformers'
quantizer registry is already imported, otherwise right after it is (an import hook), so that
``import rocketlm`` itself stays free of the seconds transformers takes to import. After that,
``AutoModelForCausalLM.from_pretrained(checkpoint)`` (and lm-eval's ``HFLM(pretrained=checkpoint)``)
rebuild the compressed model; see :mod:`rocketlm.integration.hf_quantizer`.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger(__name__)

_REGISTRY_MODULE = "transformers.quantizers.auto"
_QUANTIZER_MODULE = "rocketlm.integration.hf_quantizer"

__all__ = ["RocketHfQuantizer", "RocketQuantizationConfig", "install", "register"]


def register() -> None:
    """Register the ``rocket`` quantization method with transformers now (imports transformers; idempotent)."""
    from rocketlm.integration.hf_quantizer import register as _register
    _register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after transformers' quantizer registry module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._wrap(spec.loader.exec_module)
        return spec

    def _wrap(self, exec_module):
        def exec_and_register(module):
            exec_module(module)
            _uninstall_hook()
            if _QUANTIZER_MODULE in sys.modules:  # being imported (it imports transformers): registers at its end
                return
            try:
                register()
            except Exception:  # never break `import transformers`; load_compressed registers again and says why
                log.warning("could not register the 'rocket' quantization method with transformers", exc_info=True)
        return exec_and_register


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str):
    if name in ("RocketHfQuantizer", "RocketQuantizationConfig"):
        from rocketlm.integration import hf_quantizer
        return getattr(hf_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
