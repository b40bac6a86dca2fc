"""Where the registry's files live in the kvhub repository, and how they are written (atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RegistryFormatError
from ..registry import RegistryIndex, read_index_json

INDEX_PATH = "registry/index.json"  # a link to kvhub/data/index.json, the copy shipped in the package
ZOO_PATH = "MODEL_ZOO.md"
PLOT_PATH = "registry/compression_vs_quality.png"


@dataclass(frozen=True)
class RepoLayout:
    """The registry files under ``root``: the repository itself, or the ``--out`` folder of a dry run."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / INDEX_PATH

    @property
    def zoo(self) -> Path:
        return self.root / ZOO_PATH

    @property
    def plot(self) -> Path:
        return self.root / PLOT_PATH

    def read_index(self) -> tuple[dict[str, Any], RegistryIndex]:
        """The index document as stored, and its validated model (schema, one name per model)."""
        path = self.index
        if not path.is_file():
            raise RegistryFormatError(
                f"{path}: no registry index here; fix: run from the root of the kvhub repository or pass --root"
            )
        document = read_index_json(path, str(path))
        return document, RegistryIndex.parse(document, str(path))


def index_text(document: dict[str, Any]) -> str:
    """The index as committed: two-space indents, key order kept, a final newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so readers see the old
    file or the new one, never half of one. A symlink is followed (``registry/index.json`` links into the package):
    its target is replaced, the link stays. Returns the path written."""
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
