"""Read files into documents: .txt, .md, .jsonl (a text field per record), .pdf (pypdf).

A file that cannot be read as text (empty, binary, not UTF-8, an unreadable or scanned PDF,
a line too long to be prose) raises ``SkippedFile`` with the reason; ingestion warns with
the file's name and goes on with the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SUPPORTED = (".txt", ".md", ".markdown", ".jsonl", ".pdf")
MAX_LINE_CHARS = 200_000  # no prose paragraph is this long; minified or encoded data is
_SNIFF_BYTES = 8192  # a NUL byte this early means a binary file


class SkippedFile(Exception):
    """This file yields no documents; the message says why and what to do."""


@dataclass(frozen=True)
class Document:
    source: str  # absolute path of the file
    record: str  # a JSON Lines record's id ("line 7" when it has none), "page 3", "" for text
    title: str  # a record's title, a Markdown file's first heading, else the file's stem
    text: str


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"  # JSON Lines: the field holding the text
    title_field: str = "title"  # JSON Lines: the field holding the title, if any
    id_field: str = "id"  # JSON Lines: the field naming the record, if any
    max_line_chars: int = MAX_LINE_CHARS


def discover(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read under ``paths`` (folders searched recursively, hidden entries left out),
    sorted, each once; plus (path, reason) for named files of an unsupported type.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: dict[Path, None] = {}
    unsupported: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{raw} does not exist: pass files or folders to index")
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
                if file.is_file() and not hidden and file.suffix.lower() in SUPPORTED:
                    found[file.resolve()] = None
        elif path.suffix.lower() in SUPPORTED:
            found[path.resolve()] = None
        else:
            unsupported.append((str(path), f"unsupported file type; ragdec reads {', '.join(SUPPORTED)}"))
    return sorted(found), unsupported


def decode_text(path: Path, raw: bytes, max_line_chars: int | None) -> str:
    """The UTF-8 text of a file's bytes, or ``SkippedFile`` saying why it is not text
    (``max_line_chars=None``: lines of any length)."""
    if not raw.strip():
        raise SkippedFile("empty file")
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise SkippedFile("binary file (NUL bytes); only text, JSON Lines and PDF files are read")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SkippedFile(
            f"not UTF-8 (bad byte at offset {error.start}); convert it, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None
    longest = max((len(line) for line in text.splitlines()), default=0) if max_line_chars else 0
    if max_line_chars and longest > max_line_chars:
        raise SkippedFile(
            f"a line of {longest:,} characters (the limit is {max_line_chars:,}): minified or encoded data? "
            "split it into lines or raise --max-line-chars"
        )
    return text


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def read_text_file(path: Path, raw: bytes, options: ReadOptions) -> list[Document]:
    text = decode_text(path, raw, options.max_line_chars)
    title = (_markdown_title(text) if path.suffix.lower() in (".md", ".markdown") else None) or path.stem
    return [Document(str(path), "", title, text)]


def read_jsonl(path: Path, raw: bytes, options: ReadOptions) -> tuple[list[Document], list[str]]:
    """One document per record with a non-empty ``text_field``; notes on the lines left out.
    A record is one line however long its text, so the line limit skips records, not the file."""
    text = decode_text(path, raw, None)
    documents: list[Document] = []
    bad_json: list[int] = []
    no_text: list[int] = []
    too_long: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > options.max_line_chars:
            too_long.append(number)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad_json.append(number)
            continue
        body = record.get(options.text_field) if isinstance(record, dict) else None
        if not isinstance(body, str) or not body.strip():
            no_text.append(number)
            continue
        name = record.get(options.id_field)
        title = record.get(options.title_field)
        documents.append(
            Document(str(path), str(name) if name is not None else f"line {number}", str(title or path.stem), body)
        )
    notes = []
    if too_long:
        notes.append(
            f"{len(too_long)} records are longer than {options.max_line_chars:,} characters "
            f"(line {', '.join(map(str, too_long[:5]))}...); raise --max-line-chars to read them"
        )
    if bad_json:
        notes.append(f"{len(bad_json)} lines are not JSON (line {', '.join(map(str, bad_json[:5]))}...)")
    if no_text:
        notes.append(
            f"{len(no_text)} records have no text in field {options.text_field!r} "
            f"(line {', '.join(map(str, no_text[:5]))}...); pass --text-field NAME"
        )
    if not documents:
        raise SkippedFile("no records with text: " + "; ".join(notes) if notes else "no records")
    return documents, notes


def read_pdf(path: Path, options: ReadOptions) -> list[Document]:
    """One document per page that has a text layer."""
    try:
        import pypdf
    except ImportError:
        raise SkippedFile("pypdf is not installed: pip install pypdf==7.1.0") from None
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted:
            raise SkippedFile("encrypted PDF; decrypt it first (qpdf --decrypt in.pdf out.pdf)")
        title = (reader.metadata.title if reader.metadata else None) or path.stem
        pages = [page.extract_text() or "" for page in reader.pages]
    except SkippedFile:
        raise
    except Exception as error:  # pypdf raises many types on damaged files
        raise SkippedFile(f"unreadable PDF ({type(error).__name__}: {str(error)[:100]})") from None
    documents = [Document(str(path), f"page {i}", str(title), text) for i, text in enumerate(pages, 1) if text.strip()]
    if not documents:
        raise SkippedFile("PDF without a text layer (scanned?); run OCR first, e.g. ocrmypdf")
    return documents


def read_documents(path: Path, options: ReadOptions = ReadOptions()) -> tuple[list[Document], list[str]]:
    """Documents of one file and notes on parts left out.

    Raises:
        SkippedFile: nothing in the file could be read; the message says why.
    """
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return read_pdf(path, options), []
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SkippedFile(f"cannot read ({error.strerror})") from None
    if suffix == ".jsonl":
        return read_jsonl(path, raw, options)
    return read_text_file(path, raw, options), []
