"""Write files so that readers see the old content or the new one, never half of it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from auditlens.errors import OutputPathError


@contextmanager
def atomic_write(path: str | os.PathLike, *, newline: str | None = None,
                 binary: bool = False) -> Iterator[IO]:
    """Open a text (or ``binary``) file for writing at a temporary name beside ``path``; on
    success it is flushed to disk and renamed over ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        with (os.fdopen(fd, "wb") if binary else
              os.fdopen(fd, "w", encoding="utf-8", newline=newline)) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files to share
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename not in (None, tmp):
            raise  # another file's error, raised by the caller's own code
        raise _naming(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut, not only the bytes


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error (a full disk, a folder without write permission) naming the file
    being written instead of its hidden temporary name, or none."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, f"cannot write it: {exc.strerror}", str(path))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (),
                      make_folder: bool = False) -> Path:
    """Refuse, before any work, a file output whose path is a folder, has no folder (unless
    ``make_folder``: :func:`atomic_write` will make it), lies in a folder this user cannot
    write to, or is one of the command's ``inputs`` (writing it would replace what is being
    read)."""
    path = Path(path)
    for given in inputs:
        if path.exists() and Path(given).exists() and path.samefile(given):
            raise OutputPathError(f"{path} is the input {given}; write the output to another file")
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name for this output")
    check_not_under_a_file(path)
    if not make_folder and not path.parent.is_dir():
        raise OutputPathError(f"{path}: the folder {path.parent} does not exist")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: the folder {path.parent} is not writable; choose another path")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a folder output whose path is an existing file or lies
    under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is a file; give a folder for this output")
    check_not_under_a_file(path)
    return path


def check_not_under_a_file(path: str | os.PathLike) -> None:
    """Refuse an output path whose nearest existing parent is a file (``notes.txt/out``):
    no folder can be made there, and the error would otherwise come after all the work."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{path}: {parent} is a file, so no folder can be made there; "
                                      "choose another path")
            return


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_json_object_with(path: str | os.PathLike, keys: set[str]) -> bool:
    """Whether ``path`` holds a JSON object with every one of ``keys`` (how a command tells
    its own report.json from another's); False when it cannot be read or parsed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and keys <= data.keys()
