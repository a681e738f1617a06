"""Read files into documents: .txt, .md, .jsonl (a text field per record), .pdf (pypdf).

A file that cannot be read as text (empty, binary, not UTF-8, an unreadable or scanned PDF,
a line too long to be prose, larger than the size cap, gone or unreadable) raises
``SkippedFile`` with the reason; ingestion warns with the file's name and goes on with the
rest. A JSON Lines record that cannot be read is left out with its line number.

Folders are walked without leaving them: a symbolic link whose target lies outside the
folder is skipped with a message (what it points to would be indexed, and served by
search, as if it were part of the folder).
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SUPPORTED = (".txt", ".md", ".markdown", ".jsonl", ".pdf")
MAX_LINE_CHARS = 200_000  # no prose paragraph is this long; minified or encoded data is
# a 50 MB text file is ~10,000 pages of prose: larger ones are dumps or archives that would
# hold the run for minutes (and the whole file in memory) before the next file is read
MAX_FILE_MB = 50
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
    max_file_bytes: int = MAX_FILE_MB * 1024 * 1024  # larger files are skipped (--max-file-mb)


def discover(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read under ``paths`` (folders searched recursively, hidden entries left out),
    sorted, each once; plus (path, reason) for what was left out and should be said: named
    files of an unsupported type, symbolic links out of their folder, folders that cannot be
    listed.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: dict[Path, None] = {}
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{raw} does not exist: pass files or folders to index")
        if path.is_dir():
            found.update(dict.fromkeys(_walk(path, skipped)))
        elif path.suffix.lower() in SUPPORTED:
            found[path.resolve()] = None  # named by the user: a link is followed wherever it leads
        else:
            skipped.append((str(path), f"unsupported file type; ragdec reads {', '.join(SUPPORTED)}"))
    return sorted(found), skipped


def _walk(folder: Path, skipped: list[tuple[str, str]]) -> Iterable[Path]:
    """The supported files under ``folder`` (resolved), hidden entries left out; links that
    stay inside the folder are followed for files (not for folders: what they hold is
    reached through its own path), links out of it are skipped with a reason."""
    root = folder.resolve()

    def unlistable(error: OSError) -> None:
        skipped.append((str(error.filename), f"folder cannot be listed ({error.strerror}); its files are not indexed"))

    for here, folders, names in os.walk(folder, onerror=unlistable):  # os.walk never follows links
        here = Path(here)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        linked_folders = [name for name in folders if (here / name).is_symlink()]
        for name in sorted(names) + linked_folders:
            entry = here / name
            if name.startswith(".") or (name in names and entry.suffix.lower() not in SUPPORTED):
                continue
            target = Path(os.path.realpath(entry))  # never raises, even on a loop
            if entry.is_symlink() and not target.is_relative_to(root):
                skipped.append((str(entry), f"symbolic link to {target}, outside {folder}: not indexed "
                                            "(copy the file into the folder, or name it on the command line)"))
            elif name in names and target.is_file():
                yield target


@contextmanager
def _file_errors_as_skips():
    """A file gone or unreadable becomes ``SkippedFile`` with the reason."""
    try:
        yield
    except FileNotFoundError:
        raise SkippedFile("no longer exists (removed while the run went on?)") from None
    except OSError as error:
        raise SkippedFile(f"cannot read ({error.strerror})") from None


def check_file(path: Path, options: ReadOptions = ReadOptions()) -> os.stat_result:
    """The ``stat`` of a regular file no larger than ``options.max_file_bytes``.

    Raises:
        SkippedFile: the file is gone, not a regular file, unreadable or over the size cap.
    """
    with _file_errors_as_skips():
        info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SkippedFile("not a file (a folder, device or pipe with a file's name)")
    if info.st_size > options.max_file_bytes:
        raise SkippedFile(
            f"{_megabytes(info.st_size)}, over the limit of {_megabytes(options.max_file_bytes)}: raise it with --max-file-mb"
        )
    return info


def _megabytes(size: int) -> str:
    """Example: 52428800 -> "50 MB", 170000 -> "0.16 MB"."""
    return f"{size / 2**20:,.2f}".rstrip("0").rstrip(".") + " MB"


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
    """The text of the first ATX heading: a line of 1 to 6 "#", whitespace, the title, and
    optional closing "#"s. One pass over the lines that start with "#": the regex this
    replaces (``^#{1,6}\\s+(.+?)\\s*#*\\s*$``) backtracked cubically on a heading holding a
    long run of spaces.

    Example: ``_markdown_title("intro\\n####### no\\n## Kitchen garden ##\\n")`` ->
    ``"Kitchen garden"``; a heading with no text (``"#  "``) is passed over.
    """
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        if text.startswith("#", start):
            line = text[start:end]
            body = line.lstrip("#")
            content = body.lstrip()
            if len(line) - len(body) <= 6 and body[:1].isspace() and content:
                # closing "#"s go with the spaces around them; one character stays at least
                return content.rstrip().rstrip("#").rstrip() or content[:1]
        start = end + 1
    return None


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
    bad_unicode: list[int] = []
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
        except (ValueError, RecursionError):  # also an integer of over 4,300 digits, nesting too deep
            bad_json.append(number)
            continue
        body = record.get(options.text_field) if isinstance(record, dict) else None
        if not isinstance(body, str) or not body.strip():
            no_text.append(number)
            continue
        name = record.get(options.id_field)
        document = Document(
            str(path), str(name) if name is not None else f"line {number}", str(record.get(options.title_field) or path.stem), body
        )
        if not all(_is_unicode(text) for text in (document.record, document.title, document.text)):
            bad_unicode.append(number)
            continue
        documents.append(document)
    notes = []
    if too_long:
        notes.append(
            f"{len(too_long)} records are longer than {options.max_line_chars:,} characters "
            f"(line {', '.join(map(str, too_long[:5]))}...); raise --max-line-chars to read them"
        )
    if bad_json:
        notes.append(
            f"{len(bad_json)} lines are not JSON, or hold a number or nesting too large to read "
            f"(line {', '.join(map(str, bad_json[:5]))}...)"
        )
    if bad_unicode:
        notes.append(
            f"{len(bad_unicode)} records hold text that is not valid Unicode, a lone surrogate escape such as "
            f"\\ud800 (line {', '.join(map(str, bad_unicode[:5]))}...)"
        )
    if no_text:
        notes.append(
            f"{len(no_text)} records have no text in field {options.text_field!r} "
            f"(line {', '.join(map(str, no_text[:5]))}...); pass --text-field NAME"
        )
    if not documents:
        raise SkippedFile("no records with text: " + "; ".join(notes) if notes else "no records")
    return documents, notes


def _is_unicode(text: str) -> bool:
    """Whether ``text`` can be stored and tokenized: JSON's ``"\\ud800"`` escapes decode to
    lone surrogates, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    check_file(path, options)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return read_pdf(path, options), []
    with _file_errors_as_skips():
        raw = path.read_bytes()
    if suffix == ".jsonl":
        return read_jsonl(path, raw, options)
    return read_text_file(path, raw, options), []
