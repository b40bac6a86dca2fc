"""Rebuild the non-book domains of the evaluation protocol (corpora/README.md) from Debian 12 packages.

Every domain has one calibration file and one evaluation file made from *different* source files, so no document
is in both (``tests/test_corpora.py`` also checks that no paragraph is):

* ``python_docs``: the Python 3.11 documentation's reStructuredText sources (``apt-get install python3-doc``):
  the tutorial, howto and faq guides calibrate, and so do the library reference's files at positions 1, 4, 7, ...
  in sorted order; every third file from position 0 of the library reference evaluates. (The reference files were
  added to calibration when tunes held to the guides alone lost a point more on the reference than on any
  calibration text: benchmarks/results/frontier-4.md.)
* ``python_source``: the standard library's modules ``/usr/lib/python3.11/*.py`` at even (calibration) and odd
  (evaluation) positions in sorted order.
* ``german``: *Debian-Referenz*, the German translation of the Debian Reference (``apt-get download
  debian-reference-de``; its plain-text edition ``debian-reference.de.txt.gz``): odd chapters calibrate, even
  chapters and the appendix evaluate. Another natural language, with command lines and tables.
* ``changelogs``: Debian changelogs (``/usr/share/doc/<package>/changelog.Debian.gz`` of the installed packages),
  one per source package, sorted by source name: even positions calibrate, odd ones evaluate. Logs: dated,
  versioned, structured entries with names, bug numbers and file paths.

Each file is cut at CAP characters at a line end. ``--only`` rebuilds some domains (the others' sources need not
be installed); ``--debian-reference`` and ``--python-docs`` point at extracted packages.

    python corpora/make_domains.py --only german --debian-reference /tmp/dl/de
    python corpora/make_domains.py --only python_docs --python-docs /tmp/dl/pydoc  # python3.11-doc 3.11.2-6+deb12u9
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

DOCS = Path("usr/share/doc/python3.11/html/_sources")  # under the python3.11-doc package's root
STDLIB = Path("/usr/lib/python3.11")
DOC_ROOT = Path("/usr/share/doc")
HERE = Path(__file__).resolve().parent
CAP = 300_000  # characters per file: ~70k tokens, far more than 8 calibration or 3 evaluation windows need
CHAPTER = re.compile(r"^(?:Kapitel \d+\.|Anhang [A-Z]\.)", re.MULTILINE)


def concat(texts: list[str], cap: int = CAP) -> str:
    out, size = [], 0
    for text in texts:
        text = text.strip()
        out.append(text)
        size += len(text)
        if size >= cap:
            break
    return "\n\n".join(out)[:cap].rsplit("\n", 1)[0] + "\n"


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8") for f in files]


def python_docs(package_root: Path) -> dict[str, str]:
    docs = package_root / DOCS
    guides = sorted((docs / "tutorial").glob("*.rst.txt")) + sorted((docs / "howto").glob("*.rst.txt")) \
        + sorted((docs / "faq").glob("*.rst.txt"))
    library = sorted((docs / "library").glob("*.rst.txt"))
    return {"calibration/python_docs_guides.txt": concat(read(guides)),
            "calibration/python_docs_reference.txt": concat(read(library[1::3])),
            "evaluation/python_docs_library.txt": concat(read(library[::3]))}


def python_source() -> dict[str, str]:
    modules = sorted(STDLIB.glob("*.py"))
    return {"calibration/python_stdlib_modules_a.txt": concat(read(modules[0::2])),
            "evaluation/python_stdlib_modules_b.txt": concat(read(modules[1::2]))}


def german(package_root: Path) -> dict[str, str]:
    path = package_root / "usr/share/debian-reference/debian-reference.de.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    starts = [m.start() for m in CHAPTER.finditer(text)] + [len(text)]
    chapters = [text[a:b] for a, b in zip(starts, starts[1:])]  # the front matter (title, contents) is left out
    return {"calibration/debian_reference_de_a.txt": concat(chapters[0::2]),
            "evaluation/debian_reference_de_b.txt": concat(chapters[1::2])}


def changelogs() -> dict[str, str]:
    by_source: dict[str, str] = {}
    for path in sorted(DOC_ROOT.glob("*/changelog.Debian.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        source = text.split(" ", 1)[0].strip()
        if source and source not in by_source:  # binary packages of one source share its changelog
            by_source[source] = text
    logs = [by_source[s] for s in sorted(by_source)]
    return {"calibration/debian_changelogs_a.txt": concat(logs[0::2]),
            "evaluation/debian_changelogs_b.txt": concat(logs[1::2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=["python_docs", "python_source", "german", "changelogs"])
    ap.add_argument("--debian-reference", type=Path, default=Path("/"),
                    help="root of the extracted debian-reference-de package (default: the installed one)")
    ap.add_argument("--python-docs", type=Path, default=Path("/"),
                    help="root of the extracted python3.11-doc package (default: the installed one)")
    args = ap.parse_args()
    makers = {"python_docs": lambda: python_docs(args.python_docs), "python_source": python_source,
              "german": lambda: german(args.debian_reference), "changelogs": changelogs}
    for name in args.only or makers:
        for rel, text in makers[name]().items():
            (HERE / rel).write_text(text, encoding="utf-8")
            print(f"{rel}: {len(text)} characters")


if __name__ == "__main__":
    main()
