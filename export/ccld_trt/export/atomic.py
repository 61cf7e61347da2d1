"""Write-then-rename: a reader never sees half a file, and an interrupted write leaves the old file whole."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (``<path>.<pid>.tmp``: per process, as two writers of one directory may
    race) for the block to write; when the block succeeds, it becomes ``path`` in one rename. Creates the parent
    directory. A failed write (a full disk) leaves no temporary file and the old ``path`` whole.

    ``exclusive``: never replace an existing ``path`` (FileExistsError instead): the finished file is published
    with a hard link, which fails if the name is taken, where the file system has them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if exclusive:
            _publish_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | memoryview | str, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` through ``atomic_path`` (a reader never sees half a file); text as UTF-8,
    whatever the process's locale (a library may have set the C locale, whose default encoding is ASCII)."""
    with atomic_path(path, exclusive=exclusive) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            with open(tmp, "wb") as f:
                f.write(data)


def _publish_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (FAT, some network file systems): the check and the rename are two steps
        if path.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
