"""One exclusive lock per folder, so that two processes sharing a claim never build the same thing.

Build pods of one model share the download, the 16-bit GGUF and the importance matrix on one
claim; the test fixtures share a cache between parallel runs. ``flock`` on a lock file is released
by the kernel when its holder dies, so a killed pod never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
