"""Rebuild the out-of-domain corpora of corpora/extra/README.md from Debian's Python 3.11 packages:
``apt-get install python3-doc`` (the documentation's reStructuredText sources under
/usr/share/doc/python3.11/html/_sources) and libpython3.11-stdlib (the standard library's sources, installed with
python3.11). Calibration and evaluation take different files, so no document is in both.

    python corpora/extra/make_extra.py        # writes the four files below, deterministically
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB = Path("/usr/lib/python3.11")
HERE = Path(__file__).resolve().parent
CAP = 300_000  # characters per file: ~70k tokens, far more than 8 calibration or 3 evaluation windows need


def concat(files: list[Path], cap: int = CAP) -> str:
    out, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        out.append(text)
        size += len(text)
        if size >= cap:
            break
    return "\n\n".join(out)[:cap].rsplit("\n", 1)[0] + "\n"


def main() -> None:
    guides = sorted((DOCS / "tutorial").glob("*.rst.txt")) + sorted((DOCS / "howto").glob("*.rst.txt")) \
        + sorted((DOCS / "faq").glob("*.rst.txt"))
    library = sorted((DOCS / "library").glob("*.rst.txt"))
    modules = sorted(STDLIB.glob("*.py"))
    outputs = {
        "calibration/python_docs_guides.txt": concat(guides),
        "evaluation/python_docs_library.txt": concat(library[::3]),
        "calibration/python_stdlib_modules_a.txt": concat(modules[0::2]),
        "evaluation/python_stdlib_modules_b.txt": concat(modules[1::2]),
    }
    for name, text in outputs.items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(text)} characters")


if __name__ == "__main__":
    main()
