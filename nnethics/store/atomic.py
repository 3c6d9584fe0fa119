"""The one atomic writer: a hidden temp file in the same folder, fsync, ``os.replace``, fsync of the folder.

Every file nnethics writes (results, parts, reports, exports, lenses, lock notes) goes through
:func:`write_via_temp`, so readers see the old file or the new one, never half of one. Temp files are
hidden and end in ``.tmp``: no reader's glob (``*.nc``, ``*.csv``) ever matches one, and
:meth:`~nnethics.store.parts.PartStore.check` finds those of killed writers by the same names.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_prefix(path: Path) -> str:
    """Temp files are hidden and end in ``.tmp``: no reader's glob (``*.nc``, ``*.csv``) ever matches one."""
    return f".{path.name}."


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: str | Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_via_temp(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, then move it onto ``path`` atomically.

    The temp file is fsynced and made as readable as any new file (mkstemp creates 0600), and the folder
    is fsynced after the rename. If ``write`` (or anything after it) fails, the temp file is emptied and
    removed, ``path`` is left as it was, and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path), suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            # HDF5 may keep a failed file open until the process exits; emptying it frees the space at once.
            with contextlib.suppress(OSError):
                os.truncate(tmp, 0)
            os.remove(tmp)
        raise
    return path


def write_text_atomic(text: str, path: str | Path, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so readers see the old file or the new one, never a partial one."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)

    return write_via_temp(path, write)
