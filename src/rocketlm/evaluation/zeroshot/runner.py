"""Run the zero-shot suite on an in-memory model through lm-eval's HF wrapper."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from rocketlm.errors import ConfigError, MissingDependencyError
from .data import EXPECTED_COUNTS, LOADERS, MissingDataError, resolve_data_dir
from rocketlm.storage import model_fingerprint
from .tasks import ALL_TASKS, RACE_UNAVAILABLE, TASKS, build_hub, build_local, describe_task, resolve_tasks

logger = logging.getLogger(__name__)

AVERAGE_METRIC = "acc"
AVERAGE_DOC = ("unweighted mean over the evaluated tasks of 'acc' (the one metric every task has; "
               "MMLU counts once, with its size-weighted 57-subject acc); unavailable tasks are left out")
HUB = "hub"


class _LogStream(io.TextIOBase):
    """File-like sink that turns stray ``print`` output of lm-eval into DEBUG log records."""

    def __init__(self, log: logging.Logger):
        self._log, self._buf = log, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                self._log.debug("lm-eval: %s", line)
        return len(s)

    def flush(self) -> None:
        if self._buf.strip():
            self._log.debug("lm-eval: %s", self._buf)
        self._buf = ""


@contextlib.contextmanager
def _quiet_lm_eval():
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap stderr (LAMBADA perplexity) without a process pool
    try:
        with contextlib.redirect_stdout(_LogStream(logger)):
            yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def _require_lm_eval() -> None:
    """Clear error when lm-eval is missing or older than the API this module uses."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("zero-shot evaluation needs lm-evaluation-harness: pip install 'rocketlm[eval]' "
                          "(or pip install 'lm-eval>=0.4.13')") from exc
    try:
        from lm_eval.api.group import Group  # noqa: F401
        from lm_eval.config.group import GroupConfig  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        from importlib.metadata import version
        raise MissingDependencyError(f"lm-eval {version('lm_eval')} is too old for rocketlm's zero-shot suite "
                          f"(needs the 0.4.13 task/group API): pip install -U 'lm-eval>=0.4.13'") from exc


def _make_lm(model, tokenizer, batch_size, progress: bool):
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        """HFLM whose model-call progress bars follow ``progress``."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def request_cache_path(result_path: str | os.PathLike) -> Path:
    """Where the request cache of a run whose result goes to ``result_path`` lives."""
    return Path(result_path).with_suffix(".requests.sqlite")


def _identity_file(cache: Path) -> Path:
    return cache.with_name(cache.name + ".json")


def remove_request_cache(path: str | os.PathLike) -> None:
    """Delete a request cache and its model tag (once the run's result is written)."""
    path = Path(path)
    for f in (path, _identity_file(path)):
        f.unlink(missing_ok=True)


@contextlib.contextmanager
def _request_cache(lm, path: str | os.PathLike | None, model):
    """Wrap ``lm`` in lm-eval's ``CachingLM``: every request's answer is committed to the SQLite file
    ``path`` as soon as it is computed, so an interrupted evaluation resumes where it stopped.

    The file belongs to one model: its content hash is kept beside it (``<path>.json``) and a
    cache written for another model is discarded.
    """
    if path is None:
        yield lm
        return
    from lm_eval.api.model import CachingLM

    path = Path(path)
    identity_file = _identity_file(path)
    identity = {"model_hash": model_fingerprint(model)}
    if path.exists():
        try:
            same = json.loads(identity_file.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if same:
            logger.info("resuming zero-shot requests from %s", path)
        else:
            logger.warning("request cache %s was written for another model: starting afresh", path)
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity_file.write_text(json.dumps(identity))
    cached = CachingLM(lm, str(path))
    try:
        yield cached
    finally:
        cached.dbdict.close()


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, str):
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("rocketlm", "lm_eval", "torch", "transformers", "datasets", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _model_summary(model) -> dict[str, Any]:
    info: dict[str, Any] = {"class": type(model).__name__}
    try:
        info["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
        info["n_buffer_values"] = int(sum(b.numel() for b in model.buffers()))
        p = next(model.parameters())
        info["dtype"], info["device"] = str(p.dtype).replace("torch.", ""), str(p.device)
    except (StopIteration, AttributeError):
        pass
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        info["name_or_path"] = str(name)
    return info


_SAMPLE_METRICS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "loglikelihood"}


def _per_example(samples: list[dict[str, Any]], prefix: str = "") -> dict[str, list]:
    """Per-document values in document order: 0/1 for acc metrics, log-likelihood for LAMBADA."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    out: dict[str, list] = {"doc_id": [f"{prefix}{s['doc_id']}" if prefix else s["doc_id"] for s in samples]}
    for metric, key in _SAMPLE_METRICS.items():
        if samples and metric in samples[0]:
            vals = [s[metric] for s in samples]
            out[key] = [int(round(float(v))) for v in vals] if metric.startswith("acc") else [float(v) for v in vals]
    return out


def _leaf_metrics(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm", "perplexity"):
        if f"{metric},none" in r:
            out[metric] = _num(r[f"{metric},none"])
            out[f"{metric}_stderr"] = _num(r.get(f"{metric}_stderr,none"))
    return out


def _convert(name: str, res: dict[str, Any], built: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's result dict -> this module's per-task entry."""
    results, nsamp, samples = res["results"], res.get("n-samples", {}), res.get("samples") or {}
    groups = built.get("groups") or {}
    if name in groups:  # MMLU (or a hub group): the group aggregate plus its leaves
        g = res.get("groups", {}).get(name) or results[name]
        entry = _leaf_metrics(g)
        leaves = sorted(built["tasks"])
        entry["n"] = int(sum(nsamp[t]["effective"] for t in leaves))
        entry["n_total"] = int(sum(nsamp[t]["original"] for t in leaves))
        entry["subtasks"] = {t.removeprefix(f"{name}_"): {**_leaf_metrics(results[t]), "n": nsamp[t]["effective"]}
                             for t in leaves}
        entry["groups"] = {}
        for gname in groups:
            if gname != name:
                gr = res.get("groups", {}).get(gname) or results.get(gname, {})
                entry["groups"][gname.removeprefix(f"{name}_")] = {**_leaf_metrics(gr), "n": gr.get("sample_len")}
        per: dict[str, list] = {}
        for t in leaves:
            part = _per_example(samples.get(t, []), prefix=f"{t.removeprefix(f'{name}_')}:")
            for k, v in part.items():
                per.setdefault(k, []).extend(v)
        entry["per_example"] = per
        return entry
    (leaf,) = built["tasks"]
    entry = _leaf_metrics(results[leaf])
    entry["n"] = int(nsamp[leaf]["effective"])
    entry["n_total"] = int(nsamp[leaf]["original"])
    entry["per_example"] = _per_example(samples.get(leaf, []))
    return entry


def _average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = [t for t, e in tasks.items() if e.get("acc") is not None]
    acc = [tasks[t]["acc"] for t in names]
    alt = [tasks[t]["acc_norm"] if tasks[t].get("acc_norm") is not None else tasks[t]["acc"] for t in names]
    return {
        "metric": AVERAGE_METRIC,
        "value": sum(acc) / len(acc) if acc else None,
        "tasks": names,
        "definition": AVERAGE_DOC,
        "alternatives": {"acc_norm_else_acc": sum(alt) / len(alt) if alt else None},
    }


def evaluate_zeroshot(model, tokenizer, tasks: list[str] | str, *, data_dir: str | None = None,
                      limit: int | None = None, batch_size: int | str = 8, device: str | None = None,
                      progress: bool = True, bootstrap_iters: int = 1000,
                      model_info: dict[str, Any] | None = None,
                      request_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on the lm-eval task suite.

    ``model`` is evaluated as it is in memory (custom compact modules included) through
    ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``; it is never
    saved, reloaded or densified. ``tasks``: task names or a spec for :func:`resolve_tasks`
    (``"paper"``, ``"all"``, ``"piqa,mmlu"``). ``data_dir``: data root holding
    ``zeroshot/<task>/`` (default ``$ROCKETLM_DATA``), or ``"hub"`` for the standard hub
    datasets (needs internet). ``limit``: first N documents per task (per subject for MMLU,
    as lm-eval's ``--limit``). ``device``: the model is moved there for the run and moved
    back afterwards (None: evaluate where it is). ``bootstrap_iters`` only affects the
    stderr of LAMBADA's perplexity (the accuracies have closed-form stderrs).
    ``model_info`` (e.g. the checkpoint's achieved ratio) is copied into ``result["model"]``.
    ``request_cache``: a SQLite file where every answered request is stored at once; a rerun
    with the same file (and the same model) skips them, so an interrupted run loses nothing.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", ...,
    "per_example": {"doc_id": [...], "acc": [0/1...], ...}}}, "unavailable": {...},
    "average": {"metric": "acc", "value": ..., "tasks": [...]}, "versions": {...},
    "limit": ..., "config": {...}, "model": {...}}``.
    """
    names = resolve_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    _check_limits(limit, batch_size)
    hub = isinstance(data_dir, str) and data_dir.strip().lower() == HUB
    source, docs, unavailable = (HUB, {}, {}) if hub else _load_local_docs(names, data_dir)
    if hub:
        unavailable = {}
    run_names = [n for n in names if n not in unavailable]
    if not run_names:
        raise MissingDataError(f"none of the requested tasks ({', '.join(names)}) can be evaluated: "
                               + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    _require_lm_eval()
    out_tasks: dict[str, dict[str, Any]] = {}
    lm_versions: dict[str, Any] = {}
    with _on_device(model, device):
        with _quiet_lm_eval():
            hf_lm = _make_lm(model, tokenizer, batch_size, progress)
        with _request_cache(hf_lm, request_cache, model) as lm:
            _run_tasks(lm, run_names, docs, hub, limit, bootstrap_iters, out_tasks, lm_versions)
    config = {"tasks": names, "data": source, "limit": limit,
              "limit_semantics": "first N documents of each task (of each MMLU subject)",
              "batch_size": batch_size,
              "device": device if device is not None else _model_summary(model).get("device"),
              "num_fewshot": 0, "average_metric": AVERAGE_METRIC, "bootstrap_iters": bootstrap_iters,
              "task_definitions": {n: describe_task(n, source=("hub" if hub else "local")) for n in run_names}}
    return {"tasks": out_tasks, "unavailable": unavailable, "average": _average(out_tasks), "limit": limit,
            "config": config, "model": {**_model_summary(model), **(model_info or {})},
            "versions": {**_versions(), "lm_eval_tasks": {k: _num(v) if not isinstance(v, str) else v
                                                          for k, v in lm_versions.items()}}}


def _check_limits(limit, batch_size) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r}: must be a positive integer (documents per task) or None for all")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")


def _load_local_docs(names: list[str], data_dir) -> tuple[str, dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Parse every requested task's local files first, so a missing file fails before any model work."""
    zdir = resolve_data_dir(data_dir)
    docs: dict[str, list[dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        if not TASKS[name].local:
            unavailable[name] = RACE_UNAVAILABLE
            continue
        docs[name] = LOADERS[name](zdir)
        expected = EXPECTED_COUNTS.get(name)
        if expected is not None and len(docs[name]) != expected:
            logger.warning("%s: %d documents in %s, the published count is %d", name, len(docs[name]), zdir, expected)
    return str(zdir), docs, unavailable


@contextlib.contextmanager
def _on_device(model, device: str | None):
    """Evaluate on ``device`` (None: where the model is), in eval mode; restore both afterwards."""
    import torch
    moved_from = None
    was_training = getattr(model, "training", False)
    if device is not None and next(model.parameters()).device != torch.device(device):
        moved_from = next(model.parameters()).device
        model.to(torch.device(device))
    model.eval()
    try:
        yield model
    finally:
        if moved_from is not None:
            model.to(moved_from)
        if was_training:
            model.train()


def _run_tasks(lm, run_names, docs, hub, limit, bootstrap_iters, out_tasks, lm_versions) -> None:
    """Evaluate each task in turn, filling ``out_tasks`` and ``lm_versions``."""
    from lm_eval.evaluator import evaluate

    for name in run_names:
        t0 = time.perf_counter()
        with _quiet_lm_eval():
            built = build_hub(name) if hub else build_local(name, docs[name])
            res = evaluate(lm, built, limit=limit, log_samples=True, bootstrap_iters=bootstrap_iters)
        wall = time.perf_counter() - t0
        entry = _convert(name, res, built)
        entry["wall_time_s"] = round(wall, 3)
        entry["note"] = "" if hub else TASKS[name].note
        entry["source"] = "hub" if hub else "local"
        out_tasks[name] = entry
        lm_versions.update({k: v for k, v in (res.get("versions") or {}).items()
                            if k == name or not k.startswith(f"{name}_")})
        acc = entry.get("acc")
        logger.info("zero-shot %s: acc=%.4f%s n=%d (%.1fs)", name, float("nan") if acc is None else acc,
                    f" acc_norm={entry['acc_norm']:.4f}" if entry.get("acc_norm") is not None else "",
                    entry["n"], wall)


__all__ = ["evaluate_zeroshot", "AVERAGE_METRIC", "AVERAGE_DOC", "ALL_TASKS"]
