"""Crash-safe files: atomic writes, stale temporary files, and the checks that decide whether an item is done.

A final name only ever holds a complete file: data goes to a temporary file in the same directory
(``.<name>.<8 hex>.tmp``), is flushed and fsynced, then renamed over the final name (atomic on POSIX and Windows
within one file system), and the directory entry is fsynced. A process killed at any point leaves at most a
temporary file, which `clean_stale_temporaries` removes on the next run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
from pathlib import Path

_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the whole new one, never a part.

    On any failure (disk full, Ctrl-C) the temporary file is removed and the error propagates; ``path`` is untouched.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_bytes(target, b"hello")
        >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
        (b'hello', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    """`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image (deterministic: the same pixels give the same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def clean_stale_temporaries(directory) -> list[Path]:
    """Remove the temporary files a killed run left in ``directory`` (only names of the `atomic_write_bytes` form)."""
    removed = []
    for entry in Path(directory).iterdir():
        if _TMP.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def ensure_writable_dir(directory) -> Path:
    """Create ``directory`` if needed and prove it writable (a real write: permission bits lie under root, read-only
    mounts and quotas); an OSError naming ``--out`` otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{secrets.token_hex(4)}.tmp"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(
            exc.errno or errno.EIO,
            f"--out: expected a writable output directory, got {str(directory)!r} ({exc.strerror or exc}). Pass a "
            "directory you can write to (it is created if missing).",
        ) from exc
    return directory


def read_json(path) -> dict | None:
    """The JSON object in ``path``, or None if it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def image_ok(path, size: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` decodes completely as an image (of ``size`` = (width, height) when given)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return size is None or tuple(image.size) == tuple(size)
    except (OSError, ValueError, SyntaxError):  # PIL raises these on truncated or corrupt files
        return False
