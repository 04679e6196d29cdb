"""Atomic writes: every output appears under its final name only once it is complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from toolchain.core.errors import OutputPathError


def _temp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _publish_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; outputs get the usual umask-style modes."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success rename it to `final`, on error delete it."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputPathError(f"output {final} already exists; choose another --out or remove it")
    try:
        tmp = _temp_sibling(final, is_dir=True)
    except OSError as err:
        raise OutputPathError(f"cannot write under {final.parent}: {err.strerror}; choose a writable --out") from err
    try:
        yield tmp
        _publish_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename over `final` only if the block succeeds."""
    final = Path(final)
    tmp = _temp_sibling(final, is_dir=False)
    try:
        yield tmp
        _publish_permissions(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".build.lock"


@contextlib.contextmanager
def exclusive_dir(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `directory` for the block, or fail at once naming the holder.

    flock is released by the kernel when its holder exits, however it exits, so a killed build never
    blocks the next one; the pid written into the file only names the holder in the message.
    """
    import fcntl

    path = Path(directory) / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputPathError(f"{directory} is in use by another build (pid {holder}); wait for it to finish "
                                  "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
