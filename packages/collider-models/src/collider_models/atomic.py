"""Atomic folder writes: a checkpoint folder is either the complete old one or the complete new one.

:func:`atomic_dir` hands out a temporary folder in the destination's parent; when the block
ends without an error its files are flushed to disk and the folder takes the destination's
name by rename. An existing destination is swapped out in one step where the OS can
(Linux ``renameat2(RENAME_EXCHANGE)``), else moved aside just before the rename; either way it
is deleted only once the new folder is in place. An error inside the block removes the
temporary folder and leaves the destination untouched.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Names of the temporary and set-aside folders start with this, so loaders can skip them.
TEMP_PREFIX = ".tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_up(folder: Path) -> None:
    """Give the folder and what is in it the modes a plain ``mkdir``/``open`` would (the temporary
    folder is private, 0700, and some writers create private files)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode & 0o777 | (0o666 & ~mask))
    os.chmod(folder, 0o777 & ~mask)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened for fsync on some systems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux); False where the OS cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` atomically.

    Args:
        path: the destination folder (its parent is created if needed). If it exists it must
            be a folder; it stays complete and loadable until the new folder is in place.

    Yields:
        An empty folder in the same parent as ``path`` (so the final rename never crosses
        file systems), named with :data:`TEMP_PREFIX`.
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{str(dest)!r} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        _open_up(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            if _exchange(tmp, dest):
                old = tmp  # after the swap the temporary name holds the old folder
            else:
                old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dest.name}-old-", dir=dest.parent))
                os.rmdir(old)
                os.rename(dest, old)
                os.rename(tmp, dest)
            _fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
