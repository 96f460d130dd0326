"""File-system helpers shared by the stages that write."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


def remove_tree(path: Path) -> None:
    """Delete a directory (or file) so that no half-deleted store is ever trusted.

    ``rmtree`` deletes in no particular order: killed half-way, it could leave a
    Zarr store whose metadata still says "complete" over missing chunks, which
    read back as zeros. Renaming first makes the removal all-or-nothing for
    every reader of ``path``.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
        path.rename(trash)
        shutil.rmtree(trash)
    else:
        path.unlink()
