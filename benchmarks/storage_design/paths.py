"""Where the design scripts find the repository and keep their tensors."""
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = Path(__import__("os").environ.get("STORAGE_DESIGN_WORK", "/tmp/storage_design"))  # tensors between steps (~2 GB)
WORK.mkdir(parents=True, exist_ok=True)
