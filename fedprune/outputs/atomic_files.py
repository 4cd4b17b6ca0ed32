"""Atomic files: every file the project writes goes through here.

The content goes to a temporary file in the same directory (named
`.tmp-<pid>-<random>-<name>`, so a leftover is easy to spot and keeps the
target's suffix), is flushed and fsynced, then renamed over the target with
`os.replace`, and the directory is fsynced; a reader or a killed run sees
either the old file or the new one, never a truncated one. Serialization
happens before the temporary file is opened, so an error there (e.g. NaN in
JSON) leaves the old file as it was.

Used by reporting (tables, figures), checkpoints, the program's outputs and
model export, and the drivers.

Pure Python + numpy; no TensorFlow import.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

PathLike = str | os.PathLike


def _fsync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: pathlib.Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    # Some platforms cannot open or fsync a directory; the rename is still atomic there.
    with contextlib.suppress(OSError):
        _fsync_path(directory)


def _temporary_name(path: pathlib.Path) -> pathlib.Path:
    # Same directory, so os.replace is a rename within one filesystem.
    return path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path to write; on success it replaces `path` atomically.

    For libraries that write a file by name (e.g. Keras' `model.save`). On an
    exception the temporary file is removed and `path` is left as it was.
    """
    path = pathlib.Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; on success it replaces the file at `path` atomically.

    The directory must exist. The new file gets the default permissions
    (0o666 minus the umask), like `open(path, 'w')`. On an exception the
    temporary file is removed and `path` is left as it was.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
    """Atomically replaces the file at `path` with `data`.

    The directory must exist. The new file gets the default permissions
    (0o666 minus the umask), like `open(path, 'w')`.

    Returns:
      `path` as a `pathlib.Path`.
    """
    with atomic_writer(path) as f:
        f.write(data)
    return pathlib.Path(path)


def atomic_write_text(path: PathLike, text: str) -> pathlib.Path:
    """Atomically writes `text` as UTF-8 (newlines untranslated); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in configs and metrics; store them as plain JSON.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def read_json(path: PathLike) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def atomic_write_json(path: PathLike, obj: Any) -> pathlib.Path:
    """Atomically writes `obj` as JSON: sorted keys, indent 2, trailing newline.

    numpy scalars/arrays and paths are converted to plain JSON values.

    Raises:
      ValueError: `obj` contains NaN or an infinity (not valid JSON); the file
        is left untouched.
      TypeError: `obj` contains a value JSON cannot represent.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str], *,
             header: bool = True) -> str:
    """`rows` as CSV text ("\n" line ends; missing keys empty, floats in `repr`),
    after a header row of `fieldnames` if `header`.

    Raises:
      ValueError: a row has a key not in `fieldnames`.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(
    path: PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> pathlib.Path:
    """Atomically writes `rows` as CSV with a header row of `fieldnames`.

    Missing keys are written as empty cells; floats are written with `repr`
    precision, so they read back exactly.

    Raises:
      ValueError: a row has a key not in `fieldnames`; the file is left untouched.
    """
    return atomic_write_text(path, csv_text(rows, fieldnames))
