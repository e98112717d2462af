"""Checkpoints of block-wise analyses: finished blocks on disk, so a rerun skips them.

A checkpoint is a folder (by convention ``OUTPUT.partial`` next to the final output) with
``job.json``, which says what is being computed, and one ``block-NNNNNN.npz`` per finished
block of scan rows, each written to a temporary name and renamed, so a kill at any moment
leaves only whole blocks. A rerun of the same job loads them and computes the rest; a
different job (other input file, settings or block layout) discards them. The caller
removes the folder once the final output is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUFFIX = ".partial"


def checkpoint_path(output: str | Path) -> Path:
    """The checkpoint folder of ``output``: ``OUTPUT.partial`` beside it."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def array_digest(array: Any) -> str:
    """A short content hash of an array (shape, dtype and bytes), for job descriptions."""
    import hashlib

    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class BlockCheckpoint:
    """Per-block peak tables of one job, kept in ``folder``.

    Parameters
    ----------
    folder
        The checkpoint folder (created when the first block is opened).
    job
        JSON-serialisable description of everything the results depend on (input file
        and its modification time, settings, template...); the block layout is added by
        :meth:`open`.
    """

    def __init__(self, folder: str | Path, job: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.job = json.loads(json.dumps(job))  # normalised as it will read back

    def _block(self, index: int) -> Path:
        return self.folder / f"block-{index:06d}.npz"

    def open(self, layout: dict[str, Any], n_blocks: int) -> dict[int, list[np.ndarray]]:
        """Start or resume the job with this block layout; returns the finished blocks.

        Blocks of another job are deleted first, and so are unreadable block files (a
        disk that filled up, a copy cut short): they are simply computed again.
        """
        job = json.loads(json.dumps({**self.job, "layout": layout}))
        job_file = self.folder / JOB_FILE
        if job_file.exists():
            try:
                same = json.loads(job_file.read_text()) == job
            except (OSError, ValueError):
                same = False
            if not same:
                logger.info("%s holds another job's blocks: starting afresh", self.folder)
                self.remove()
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not job_file.exists():
            _write_atomic(job_file, json.dumps(job, indent=1).encode())
        done = {}
        for index in range(n_blocks):
            path = self._block(index)
            if path.exists():
                try:
                    done[index] = _read_tables(path)
                except (OSError, ValueError, KeyError) as err:
                    logger.warning("recomputing block %d: %s is unreadable (%s)", index, path, err)
                    path.unlink(missing_ok=True)
        return done

    def save(self, index: int, tables: list[np.ndarray]) -> None:
        """Record the per-pattern ``(n, 3)`` tables of block ``index`` (atomically)."""
        counts = np.array([len(t) for t in tables], dtype=np.int64)
        rows = np.concatenate(tables) if tables else np.zeros((0, 3))
        tmp = self.folder / f".{self._block(index).name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, counts=counts, rows=np.asarray(rows, np.float64).reshape(-1, 3))
        os.replace(tmp, self._block(index))

    def remove(self) -> None:
        """Delete the checkpoint folder (after the final output is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_tables(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        counts, rows = f["counts"], f["rows"]
    if counts.sum() != len(rows):
        raise ValueError(f"{counts.sum()} peaks counted, {len(rows)} stored")
    return np.split(rows, np.cumsum(counts)[:-1])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
