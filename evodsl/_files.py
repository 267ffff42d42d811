"""Writing an output file whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path, write) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename: a failure
    leaves nothing behind (and an older file as it was). The file gets the permissions a plain open() would
    (0666 less the umask), not mkstemp's private 0600."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=target.suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
