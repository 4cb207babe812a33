"""Atomic file writes: an artifact is either complete or absent, never half-written (Ctrl-C, full disk, crash)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); elsewhere set-and-restore
    under a lock (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give a file made by mkstemp/mkdtemp (always 0600/0700) the mode a plain open()/mkdir() would have:
    0666/0777 minus the umask (0644/0755 under umask 022), so a Triton or Docker process running as another
    user can read the artifact."""
    directory = os.path.isdir(path) if directory is None else directory
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success it replaces `path` in one rename.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is untouched.
    The result has the umask's mode (0644 under 022), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            apply_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet (what mkdir(parents=True) would create)."""
    out: list[Path] = []
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def remove_empty_dirs(dirs: list[Path]) -> None:
    """rmdir each folder that is empty, deepest first (a folder holding anything is left alone)."""
    for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def file_key(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """What identifies one version of a file, for caches: resolved path, inode, mtime (ns) and size. An atomic
    rewrite changes the inode, an in-place one the mtime or size."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_ino, st.st_mtime_ns, st.st_size


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
