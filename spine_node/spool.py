"""Durable files on disk: received images (spool) and result objects (outbox).

File names never come from received values: they are the SHA-256 of the SOP Instance UID,
so nothing can be written outside the configured directory whatever a sender puts in a UID.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

_COPY_CHUNK = 4 * 1024 * 1024


class SpoolFull(OSError):
    """Free space is below the configured watermark."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 when missing and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def relative_name(uid: str, suffix: str = ".dcm") -> str:
    """Return the relative path for an object: ``ab/abcdef....dcm`` from the UID's SHA-256.

    Parameters
    ----------
    uid : str
        Any string (a UID as received; it may hold anything).
    suffix : str
        File suffix.
    """
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{digest[:2]}/{digest}{suffix}"


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def target_path(root: Path, relative: str) -> Path:
    """Resolve ``root/relative``, refuse a path escaping ``root``, create its folder (0700)."""
    target = (root / relative).resolve()
    if root.resolve() not in target.parents:
        raise ValueError(f"relative path {relative!r} escapes {root}")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return target


def write_durable(root: Path, relative: str, data: bytes | Path, min_free_bytes: int = 0) -> Path:
    """Write ``data`` to ``root/relative`` atomically and durably.

    The bytes go to a temporary file in the target directory, which is fsynced, renamed over the
    target and the directory fsynced. On any failure the temporary file is removed, so no partial
    file is ever visible under the final name.

    Parameters
    ----------
    root : pathlib.Path
        Spool or outbox directory.
    relative : str
        Relative path from :func:`relative_name`.
    data : bytes or pathlib.Path
        Content, or a file whose content is copied (in chunks: memory stays bounded).
    min_free_bytes : int
        Refuse (``SpoolFull``) when less than this would remain free after writing.

    Returns
    -------
    pathlib.Path
        The final path.
    """
    target = target_path(root, relative)
    directory = target.parent
    if min_free_bytes:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        free = shutil.disk_usage(directory).free
        if free - size < min_free_bytes:
            raise SpoolFull(f"only {free} bytes free in {root}, watermark {min_free_bytes}")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=_part_prefix(), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, fh, _COPY_CHUNK)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, target)
        fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


#: Temporary files of :func:`write_durable`: ``.incoming-<pid>@<host>@<random>.part``.
_PART_RE = re.compile(r"^\.incoming-(\d+)@([^@/]*)@[^@/]*\.part$")
#: A part file of another host (shared spool or outbox) is removed after this long.
_FOREIGN_PART_AGE_S = 24 * 3600.0


def _host() -> str:
    return socket.gethostname().replace("@", "_").replace("/", "_")


def _part_prefix() -> str:
    """Names the writing process, so that another process sharing the folder keeps its file."""
    return f".incoming-{os.getpid()}@{_host()}@"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_parts(root: Path, now: float | None = None) -> int:
    """Delete temporary ``.part`` files left by a crash; return how many were removed.

    The spool and the outbox may be shared by several processes (scale-out: one receiver
    and several workers on a shared folder), so a part file is only removed when its writer
    is gone: a process of this host that no longer runs, or any writer after 24 hours.
    """
    if not root.exists():
        return 0
    now = time.time() if now is None else now
    host = _host()
    count = 0
    for part in root.rglob(".incoming-*.part"):
        match = _PART_RE.match(part.name)
        if match is not None and match.group(2) == host:
            stale = not _alive(int(match.group(1)))
        else:
            try:
                stale = match is None or now - part.stat().st_mtime > _FOREIGN_PART_AGE_S
            except FileNotFoundError:
                continue
        if stale:
            part.unlink(missing_ok=True)
            count += 1
    return count
