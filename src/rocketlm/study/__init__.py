"""The allocation-cost study (ActCost paper, arXiv 2606.27785) as one verb: :func:`run_study`.

* :mod:`.config`: :class:`StudyConfig`, the one place the study's defaults are written.
* :mod:`.runner`: orchestration (one profiling pass per seed, every ratio x cost compressed and
  evaluated, resumable per run), writes ``study.json``, ``report.md`` and ``figures/``.
* :mod:`.records`: the per-run records (``runs/*.json``); :mod:`.result`: the assembled
  :class:`StudyResult` (``study.json``).
* :mod:`.stats`: Spearman (scipy), mean/std over seeds, paired bootstrap CIs (pure functions).
* :mod:`.analysis`: error correlation, best-ks disagreement, allocation divergence, sweep.
* :mod:`.compare`: main table, paired statistics, runtime from the run records.
* :mod:`.figures`, :mod:`.report`: PNG figures and the markdown report.
* :mod:`.cli`: the ``rocketlm study`` subcommand.
"""
from rocketlm.study.config import StudyConfig
from rocketlm.study.result import StudyResult
from rocketlm.study.runner import run_study

__all__ = ["StudyConfig", "StudyResult", "run_study"]
