"""The one atomic writer: a hidden temp file in the same folder, fsync, ``os.replace``, fsync of the folder.

Every file nnethics writes (results, parts, reports, exports, lenses, lock notes) goes through
:func:`write_via_temp`, so readers see the old file or the new one, never half of one. Temp files are
hidden and end in ``.tmp``: no reader's glob (``*.nc``, ``*.csv``) ever matches one, and
:meth:`~nnethics.store.parts.PartStore.check` finds those of killed writers by the same names. A set of files
that belong together (an export) is written into a hidden staging folder and moved in at the end,
its manifest last (:func:`staged_folder`): all or nothing. :func:`write_problem` words a full disk or a
folder that cannot be written as a :class:`StoreError` (exit code 2 on the command line).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


class StoreError(RuntimeError):
    """The store cannot be written (no space, read-only, not a folder); the message says where and what to do."""


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


def write_problem(err: OSError, folder: Path, name: str | None, fix: str) -> StoreError | None:
    """``err`` of writing ``name`` (None: some file) into ``folder`` in words, as a :class:`StoreError` ending in
    ``fix`` (what the user can do instead), when it is a full disk or a folder that cannot be written; else None."""
    what = f" while writing {name}" if name else ""
    if err.errno in NO_SPACE:
        return StoreError(f"no space left on device at {folder}{what}; free some space, or {fix}")
    if err.errno in DENIED:
        return StoreError(f"cannot write {name + ' in ' if name else 'to '}{folder} ({err.strerror or err}); {fix}")
    return None


def _staged_name(err: OSError, stage: Path | None) -> str | None:
    """The file a failed write into the stage was writing (its temp file's name without the temp affixes)."""
    failed = Path(str(err.filename or "/"))
    if stage is None or failed.parent != stage:
        return None
    return failed.name[1:].rsplit(".", 2)[0] if failed.name.endswith(TMP_SUFFIX) else failed.name


@contextlib.contextmanager
def staged_folder(out: str | Path, last: str, fix: str) -> Iterator[Path]:
    """All or nothing: yield a hidden staging folder inside ``out`` (created if missing) to write every file into;
    when the block ends, move them into ``out`` (``os.replace`` each, ``last`` last, after ``out/last`` is
    removed), so ``out/last`` (a manifest) exists only beside a complete set. A write that fails (a full disk, a
    read-only folder) leaves ``out`` as it was and raises :class:`StoreError` ending in ``fix`` (see
    :func:`write_problem`); the staging folder is removed either way."""
    out = Path(out)
    stage = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=f".{out.name}.", suffix=TMP_SUFFIX))
        yield stage
        names = sorted(p.name for p in stage.iterdir() if p.name != last)
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / last)  # never a manifest beside a half-moved set
        for name in [*names, last]:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        _fsync_path(out)
    except OSError as err:
        problem = write_problem(err, out, _staged_name(err, stage), fix)
        if problem is None:
            raise
        raise problem from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
