"""Checks of a compression run's arguments that need no model: run before anything expensive,
so a bad input answers in seconds with one line that says what to do."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rocketlm.calibration.data import default_calib_files
from rocketlm.config import RocketConfig
from rocketlm.errors import ConfigError, DataError, OutputDirError

def check_calibration_files(config: RocketConfig, data_dir: str | None) -> tuple[str, ...]:
    """The calibration files exist, are files, and are not empty (a hub dataset is checked when read)."""
    if config.calib_dataset:
        return ()
    files = config.calib_files or default_calib_files(data_dir)
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"calibration file {path} does not exist; pass existing files with --calib")
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"calibration file {path}: unsupported type; use .txt or .jsonl (with a 'text' field)")
        if path.stat().st_size == 0:
            raise DataError(f"calibration file {path} is empty; pass a file with text in it")
        if not os.access(path, os.R_OK):
            raise DataError(f"calibration file {path} is not readable (check its permissions)")
    return tuple(files)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """``out_dir`` can be created and written, and holds nothing but (with ``overwrite``) an earlier checkpoint."""
    from rocketlm.checkpoint.io import is_checkpoint  # lazy: checkpoint.io calls this check when saving

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not is_checkpoint(out):
            raise OutputDirError(f"{out} is not empty and is not a rocketlm checkpoint; "
                                 "choose a new or empty directory (nothing was written)")
        if not overwrite:
            raise OutputDirError(f"{out} already holds a rocketlm checkpoint; pass --overwrite to replace it "
                                 "or choose another directory")
    parent = out if out.is_dir() else _existing_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"{out}: cannot write in {parent} (permission denied); choose another directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputDirError(f"{out}: cannot write in {parent} ({exc.strerror}); choose another directory") from None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise OutputDirError(f"{path} is a file, so no directory can be created under it")
    return path


def check_reachable(config: RocketConfig) -> None:
    """A target above the grid's largest removed ratio can never be met: say so before calibrating."""
    largest = max(config.grid.removed_ratios)
    if config.removed_ratio > largest + 1e-9:
        raise ConfigError(
            f"--ratio {config.removed_ratio} cannot be reached: the grid's largest removed ratio is {largest} "
            f"(no layer can lose more than that). Lower --ratio to at most {largest} or extend the grid, e.g. "
            f"--grid 'removed=0.05:{min(0.95, round(config.removed_ratio + 0.1, 2))}:0.05;ks=1.0:3.0:0.1'")


def check_processes(config: RocketConfig, world_size: int) -> None:
    """Sequential calibration (and the upstream correction it carries) runs in one process."""
    from rocketlm.compression.sequential import uses_refit_stage
    if world_size > 1 and uses_refit_stage(config):
        raise ConfigError("--sequential / --upstream-correction run in one process only; start rocketlm compress "
                          "without torchrun for these options (rocketlm estimate: --nproc 1)")


def check_compress_inputs(config: RocketConfig, out_dir: str | os.PathLike | None, data_dir: str | None,
                          overwrite: bool = False, world_size: int = 1) -> None:
    """Every check that needs no model: target reachable, options possible with this many processes,
    calibration data present, output writable."""
    check_reachable(config)
    check_processes(config, world_size)
    check_calibration_files(config, data_dir)
    if out_dir is not None:
        check_output_dir(out_dir, overwrite)
