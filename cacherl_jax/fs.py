"""The one filesystem seam: every workdir path goes through `workdir_path`, an etils `epath.Path`
(the library orbax uses for checkpoints), so a run can write to local disk or to `gs://...`
(with `gcsfs` installed) with the same code.

Only the tool cache's SQLite file stays local by design (see `cacherl_jax.agent.tool_cache.snapshot`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
from etils import epath


def is_remote(path: str | os.PathLike[str]) -> bool:
    """`gs://`, `s3://` and other URLs, as opposed to a local path."""
    return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike[str]) -> epath.Path:
    """`path` as an `epath.Path`; a local one made absolute (so it survives a `chdir`)."""
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def append_text(path: epath.Path, text: str) -> None:
    """Appends to a file, creating it; object stores cannot append, so there it rewrites."""
    if not is_remote(path):
        with path.open("a") as f:
            f.write(text)
        return
    path.write_text((path.read_text() if path.exists() else "") + text)


@contextlib.contextmanager
def local_directory(path: epath.Path) -> Iterator[Path]:
    """A local directory to write `path`'s files into, for writers that need local files (the
    safetensors export): `path` itself when local; for a remote `path`, a temporary directory
    whose files process 0 uploads there on exit, replacing what was there."""
    if not is_remote(path):
        yield Path(os.fspath(path))
        return
    with tempfile.TemporaryDirectory(prefix="cacherl-export-") as local:
        yield Path(local)
        if jax.process_index() == 0:
            if path.exists():
                path.rmtree()
            path.mkdir(parents=True)
            for file in Path(local).iterdir():
                (path / file.name).write_bytes(file.read_bytes())
