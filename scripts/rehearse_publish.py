"""Rehearse `kvhub registry publish` in one command, against the local Hub server the tests use.

    python scripts/rehearse_publish.py presets/<org>--<name> [options of kvhub registry publish]

Starts tests/hub_server.py's LocalHub on 127.0.0.1 (storage, Hugging Face home and cache in a temporary folder, so
neither your cache nor the public Hub is touched), then runs

    kvhub registry publish PRESET --dry-run --endpoint <local hub> --out <out> [options]

which verifies the preset, pushes it to the local hub, reads it back, and writes the updated registry/index.json,
MODEL_ZOO.md and plot under --out (default: rehearsal/<org>--<name>, next to this checkout's files; the
repository itself is left alone). Exit status is publish's. Run it from the repository root of a clone (it needs
tests/hub_server.py, which is not part of the installed package).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from tests.hub_server import DEFAULT_TOKEN, LocalHub

    preset, options = argv[0], argv[1:]
    if "--out" not in options:
        options += ["--out", str(Path("rehearsal") / Path(preset).name)]
    with tempfile.TemporaryDirectory(prefix="kvhub-rehearsal-") as tmp, LocalHub(Path(tmp) / "hub") as hub:
        print(f"local hub {hub.endpoint} (storage {tmp}, removed afterwards)", flush=True)
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": DEFAULT_TOKEN, "HF_HOME": str(Path(tmp) / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
        env.pop("HF_HUB_CACHE", None)
        command = [sys.executable, "-m", "kvhub.cli", "registry", "publish", preset, "--dry-run",
                   "--endpoint", hub.endpoint, *options]
        return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
