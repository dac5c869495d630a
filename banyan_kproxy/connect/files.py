"""
Private files written atomically: the kubeconfig, the ID token cache, a rotated
refresh token.

A reader (kubectl, a concurrent plugin process) sees either the old file or the new
one, never half of one, and the new file is readable by its owner only.
"""

from __future__ import annotations

import os
import tempfile


def write_private_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace ``path`` with ``data``: written to a temporary file in the same
    directory with ``mode``, flushed to disk, then renamed over ``path``.

    A symbolic link at ``path`` is followed, so the file it points to is replaced.
    Missing parent directories are created (mode 0700).
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
