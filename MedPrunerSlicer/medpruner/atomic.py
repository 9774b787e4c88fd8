"""Write a file under a temporary name beside its target, then rename it into place.

Readers (Slicer, the server, the user's tools) never see a half-written output, and an interrupted
run leaves no partial file under the real name.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call `write(tmp_path)` for a temporary path in `path`'s folder, then os.replace it onto `path`.

    `suffix` keeps the extension writers look at (e.g. ".nrrd" for SimpleITK). The file gets the
    permissions of an ordinary new file (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
