"""Text that came from a file someone else wrote (a preset config, a registry index, a Hub repo) on its way into
generated Markdown, HTML or a terminal.

Identifiers are validated where they are read (Hub repo ids); everything else is free text and is escaped at the
point it is rendered: :func:`escape_markdown` for Markdown prose and table cells (no emphasis, links, images,
headings, HTML tags or comments, table breaks, and no new line that could start a block), :func:`code_span` for
inline code, :func:`escape_html` for HTML, :func:`printable` before anything reaches a terminal (ESC/OSC sequences,
carriage returns and bidi overrides would let a config rewrite what the user sees). Ordinary text (``austen_emma``,
``x86_64 CPU, torch 2.13.0+cpu``) comes out unchanged, so generated files stay byte-identical for honest input.
"""

from __future__ import annotations

import html
import re

# C0/C1 controls, DEL, and Unicode format characters (bidi overrides, zero-width joiners, ...).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
_LINE_BREAKS = re.compile(r"[\r\n\u0085\u2028\u2029]+")
# Characters that start Markdown/HTML syntax wherever they stand; '_' only matters at a word edge (intraword
# underscores never open emphasis in CommonMark), so snake_case names stay as they are.
_MD_SPECIAL = re.compile(r"[\\`*\[\]<>&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def _escape_char(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control and format character shown as a visible escape (``\\x1b``, ``\\u202e``).

    ``keep_newlines`` leaves ``\\n`` alone, for multi-line output that kvhub itself composed."""
    s = str(text)
    if keep_newlines:
        return "\n".join(_UNPRINTABLE.sub(lambda m: _escape_char(m.group()), line) for line in s.split("\n"))
    return _UNPRINTABLE.sub(lambda m: _escape_char(m.group()), s)


def _one_line(text: object) -> str:
    return printable(_LINE_BREAKS.sub(" ", str(text)))


def escape_markdown(text: object) -> str:
    """``text`` as literal Markdown inline text: one line, every syntax character backslash-escaped or an entity."""
    return _MD_SPECIAL.sub(lambda m: _MD_ENTITIES.get(m.group(), "\\" + m.group()), _one_line(text))


def code_span(text: object) -> str:
    """``text`` as a Markdown inline code span, delimited by more backticks than any run inside it (CommonMark)."""
    s = _one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def escape_html(text: object) -> str:
    """``text`` safe inside an HTML element or a quoted attribute."""
    return html.escape(printable(text), quote=True)


__all__ = ["printable", "escape_markdown", "code_span", "escape_html"]
