"""How the engine writes files that others read: whole (a temporary name, then a rename) and readable by other users.

Modes are set explicitly, whatever the process's umask or the writer left (safetensors and mkstemp make files 0600):
a saved model or a checkpoint is read by another process, which may run as another user. Who may reach them at all
is decided by the folder they are written into.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def write_whole(dest: Path, write: Callable[[Path], None]) -> None:
    """write(path) to an unpredictable name beside dest, then renamed onto it: readers never see half a file, and
    nobody can plant or guess the temporary name in a folder others can write to. Nothing is left on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_to_readers(folder: Path) -> None:
    """Every file under folder FILE_MODE and every folder (itself included) DIR_MODE."""
    folder.chmod(DIR_MODE)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
