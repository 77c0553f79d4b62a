"""Atomic artifact folders: build in a hidden sibling, rename into place when complete.

A process killed at any point leaves either the previous folder or no folder at `out`, never a
half-written one; the partial sibling (and a replaced artifact set aside) is swept by the next run
once its writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _partial_name(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.partial-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(out: Path) -> None:
    """Remove what dead writers left: unfinished folders and replaced artifacts set aside."""
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            suffix = stale.name.rsplit("-", 1)[-1]
            if suffix.isdigit() and (int(suffix) == os.getpid() or not _alive(int(suffix))):
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(out)
    work = _partial_name(out, os.getpid())
    work.mkdir()
    try:
        yield work
        _fsync_tree(work)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
