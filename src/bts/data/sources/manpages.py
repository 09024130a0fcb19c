"""Built-in domain `man` (opt-in): the English manual pages this machine has installed.

Not part of the default domains, because its documents depend on the machine: every system has
other pages, and a slim container none. List `man` in `data.domains` to use it.
Source: English manual pages under `/usr/share/man/man1`..`man8` (Debian packages; each page
under its package's free licence, see `/usr/share/doc/<package>/copyright`). Pages are rendered
to plain text by a small roff reader here (no `groff` needed). Skipped: aliases (`.so`), mdoc
pages, duplicates, and the Google Cloud SDK's `gcloud_*` pages (thousands of pages generated
from one template). Pages are taken in a fixed pseudo-random order (a hash of their path) until
`max_chars`, so the cap keeps a spread of sections and packages.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from bts.data.sources import Document, Domain, hashed_order, take_chars
from bts.errors import BtsError

DEFAULT_MAX_CHARS = 6_000_000
MAN_ROOT = Path("/usr/share/man")
MIN_PAGE_CHARS = 300
SKIPPED_PREFIXES = ("gcloud_", "gcloud.")

SPECIAL_CHARS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×", "de": "°",
    "->": "→", "<-": "←", ">=": "≥", "<=": "≤", "!=": "≠", "+-": "±", "ti": "~", "ha": "^",
    "rs": "\\", "sl": "/", "ba": "|", "br": "|", "ul": "_", "Fo": "«", "Fc": "»", "lh": "☜",
    "rh": "☞", "ua": "↑", "da": "↓", "dg": "†", "sc": "§", "ps": "¶", "Eu": "€", "at": "@",
    "sh": "#", "Do": "$", "C`": '"', "C'": '"', "L\"": '"', "R\"": '"',
}  # fmt: skip

ESCAPE = re.compile(
    r"""\\(?:
      f(?:\(..|\[[^\]]*\]|.)
    | s(?:[+-]?\d+|\(..|\[[^\]]*\]|'[^']*')
    | \((?P<two>..)
    | \[(?P<name>[^\]]*)\]
    | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))
    | [nk](?:\(..|\[[^\]]*\]|.)
    | [hvwoXZDlLbxHSRNC]'[^']*'
    | (?P<char>.)
    )""",
    re.VERBOSE,
)
SIMPLE_ESCAPES = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'",
                  "`": "`", ".": ".", "t": "\t"}  # fmt: skip
ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
JOINED_FONT_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}
SPACED_FONT_MACROS = {"B", "I", "SM", "SB"}
BREAK_MACROS = {"PP", "P", "LP", "HP", "sp", "br", "RS", "RE", "TQ", "PD", "in", "ti", "bp"}
NOFILL_ON, NOFILL_OFF = {"nf", "EX", "Vb"}, {"fi", "EE", "Ve"}


def _unescape(match: re.Match[str]) -> str:
    """Replace one roff escape by the text it prints (fonts, sizes, registers print nothing)."""
    name = match.group("two") or match.group("name") or match.group("str2")
    name = name or match.group("strn") or match.group("str1")
    if name is not None:
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return SPECIAL_CHARS.get(name, "")
    char = match.group("char")
    return SIMPLE_ESCAPES.get(char, "" if char in "&|^,/:c%z!{}" else char) if char else ""


def roff_text(line: str) -> str:
    """A roff text line with escapes resolved and trailing comments removed."""
    line = re.split(r'\\["#]', line, maxsplit=1)[0]
    return ESCAPE.sub(_unescape, line)


def roff_args(rest: str) -> list[str]:
    """Macro arguments, honouring double-quoted groups."""
    return [roff_text(q.replace('""', '"') if q else w) for q, w in ROFF_ARG.findall(rest)]


class _Page:
    """Accumulates rendered blocks: filled paragraphs (lines joined by spaces) and verbatim
    no-fill blocks (lines kept)."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.lines: list[str] = []
        self.nofill = False

    def flush(self) -> None:
        block = ("\n" if self.nofill else " ").join(self.lines).strip("\n ")
        if block:
            self.blocks.append(block)
        self.lines = []

    def text(self, line: str) -> None:
        if self.nofill:
            self.lines.append(line.rstrip())
        elif not line.strip():
            self.flush()
        else:
            self.lines.append(line.strip())

    def render(self) -> str:
        self.flush()
        return "\n\n".join(self.blocks)


def _request(page: _Page, macro: str, rest: str) -> None:
    """Apply one macro (request) line to the page; unknown macros print nothing."""
    if macro in ("SH", "SS"):
        page.flush()
        page.text(" ".join(roff_args(rest)))
        page.flush()
    elif macro in JOINED_FONT_MACROS:
        page.text("".join(roff_args(rest)))
    elif macro in SPACED_FONT_MACROS and rest.strip():
        page.text(" ".join(roff_args(rest)))
    elif macro in ("TP", "IP"):
        page.flush()
        if macro == "IP" and rest.strip():
            page.text(roff_args(rest)[0])
    elif macro in BREAK_MACROS:
        page.flush()
    elif macro in NOFILL_ON or macro in NOFILL_OFF:
        page.flush()
        page.nofill = macro in NOFILL_ON


def _is_macro_end(line: str) -> bool:
    return line.strip() == ".."


def _closes_block(line: str) -> bool:
    return "\\}" in line


def _ends_table_format(line: str) -> bool:
    """A table's format section ends with the first line ending in a full stop."""
    return line.rstrip().endswith(".")


def man_to_text(source: str) -> str | None:
    """Plain text of a man(7) page, or None for aliases and mdoc(7) pages."""
    lines = source.splitlines()
    if any(line.startswith((".so ", ".Dd")) for line in lines[:40]):
        return None
    page, in_table = _Page(), False
    skip_until: Callable[[str], bool] | None = None
    for line in lines:
        if skip_until is not None:
            if skip_until(line):
                skip_until = None
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].lstrip().partition(" ")
            if macro in ("de", "de1", "am", "ig"):
                skip_until = _is_macro_end
            elif "\\{" in line and "\\}" not in line:
                skip_until = _closes_block
            elif macro == "TS":
                page.flush()
                in_table = True
                skip_until = _ends_table_format
            elif macro == "TE":
                in_table = False
            else:
                _request(page, macro, rest)
        elif in_table:
            cells = line.replace("T{", "").replace("T}", "").split("\t")
            page.blocks.append(" ".join(roff_text(c).strip() for c in cells if c.strip()))
        else:
            page.text(roff_text(line))
    return page.render()


def man_pages(root: Path) -> list[Path]:
    """English man pages (sections 1-8, not symlinks), in a fixed pseudo-random order."""
    pages = [
        p
        for p in root.glob("man[1-8]/*")
        if p.is_file() and not p.is_symlink() and not p.name.startswith(SKIPPED_PREFIXES)
    ]
    return sorted(pages, key=lambda p: hashed_order(f"{p.parent.name}/{p.name}"))


def read_man_page(path: Path) -> str | None:
    """Rendered text of one (possibly gzipped) man page; None if unreadable or not prose."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    text = man_to_text(raw.decode("utf-8", errors="replace"))
    return text if text is not None and len(text) >= MIN_PAGE_CHARS else None


def man_documents(root: Path) -> Iterator[Document]:
    """Rendered man pages, skipping exact duplicates (the same page under two names)."""
    seen: set[str] = set()
    for path in man_pages(root):
        text = read_man_page(path)
        digest = hashlib.sha256(text.encode()).hexdigest() if text else ""
        if text and digest not in seen:
            seen.add(digest)
            yield Document(id=f"man/{path.parent.name}/{path.name}", text=text)


def domain(max_chars: int | None = DEFAULT_MAX_CHARS, man_root: Path = MAN_ROOT) -> Domain:
    """The `man` domain: the machine's English man pages (none if it has no man pages)."""
    if not man_root.is_dir():
        raise BtsError(f"built-in domain 'man' needs manual pages under {man_root}: install them "
                       "(apt-get install man-db manpages) or drop 'man' from data.domains")
    return Domain(
        name="man",
        source=f"English man pages under {man_root} (this machine's)",
        licence="their Debian packages' free licences",
        read=partial(take_chars, man_documents(man_root), max_chars),
    )
