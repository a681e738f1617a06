"""The one way ragdec writes a file and reads JSON Lines.

Every file ragdec or its benchmarks put in place (a store's manifest and index, a model's
manifest, a measured cost curve, an exit adapter, a benchmark's JSON) goes through
``atomic_write``: the bytes land in a temporary file beside the target, are fsynced, the
file is renamed over the target, and the directory is fsynced so that the rename itself
survives a crash. A reader sees the old file or the new one, never half of either.

Every JSON Lines file goes through ``read_jsonl``, whose errors name the file and the line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class JsonlError(ValueError):
    """A JSON Lines file that cannot be read; the message names the file and the line."""


def fsync_directory(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_rename(source: str | Path, target: str | Path) -> Path:
    """Rename a finished file or folder onto ``target`` so that it survives a crash: its
    contents are fsynced first (every file, for a folder), the directory after the rename.
    For what another library wrote in full (a SQLite file, a model folder)."""
    source, target = Path(source), Path(target)
    for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    if source.is_dir():
        fsync_directory(source)
    os.replace(source, target)
    fsync_directory(target.parent)
    return target


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed
    onto ``path`` (and the directory fsynced); on an exception it is removed.

    For writers that take a file name (``faiss.write_index``, ``safetensors.save_file``)::

        with atomic_path(folder / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600; ragdec's files are data like any other
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[IO], None] | str | bytes, binary: bool = False) -> Path:
    """Write ``path`` atomically: ``write`` is the content (str or bytes) or a function that
    writes to an open file (text, UTF-8, unless ``binary``).

    Example: ``atomic_write(p, lambda f: json.dump(payload, f))`` leaves either the old
    ``p`` or the whole new one, whatever happens in between.
    """
    with atomic_path(path) as tmp:
        if isinstance(write, (str, bytes)):
            content = write
            binary = isinstance(content, bytes)

            def write(f: IO) -> None:
                f.write(content)

        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(payload, path: str | Path) -> Path:
    """``payload`` as indented JSON at ``path``, written atomically."""

    def dump(f: IO) -> None:
        json.dump(payload, f, indent=2, ensure_ascii=False)
        f.write("\n")

    return atomic_write(path, dump)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, record)`` for each non-blank line of a JSON Lines file.

    Raises:
        JsonlError: naming the file and line, for a line that is not a JSON object, or a
            file that is not UTF-8 or cannot be opened.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as error:
                    raise JsonlError(f"{path}, line {number}: not valid JSON ({error})") from None
                if not isinstance(record, dict):
                    raise JsonlError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except UnicodeDecodeError as error:
        raise JsonlError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise JsonlError(f"{path}: cannot read ({error.strerror or error})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSON Lines file (see ``iter_jsonl`` for the errors)."""
    return [record for _, record in iter_jsonl(path)]
