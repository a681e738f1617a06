"""Data shared by the retrieval, pipeline and app tests: a small corpus of real SQuAD
paragraphs (the shipped sample), files good and bad, a hand-made PDF.

Imported by those modules (``from retrieval_fixtures import ...``); the real embedders are
the ``minilm`` and ``e5`` fixtures of conftest.py. ``store_backend`` runs a test once per
retrieval backend (import it into the test module to use it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ragdec.data import sample_corpus_path

QA_DATA = Path(__file__).parent / "data" / "qa"  # 41 SQuAD paragraphs and 81 questions about them

# SQuAD v1.1 dev questions (CC BY-SA 4.0) about paragraphs of the shipped sample corpus
SAMPLE_QUESTIONS = {
    "In what year was Nikola Tesla born?": "Nikola_Tesla#0",
    "Where did the black death originate?": "Black_Death#0",
    "What was Maria Curie the first female recipient of?": "Warsaw#0",
    "In what country is Normandy located?": "Normans#0",
}


def sample_records(per_article: int = 6) -> list[dict]:
    """The first paragraphs of each article in the shipped sample (42 records by default)."""
    counts: dict[str, int] = {}
    records = []
    with open(sample_corpus_path(), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if counts.get(record["title"], 0) < per_article:
                counts[record["title"]] = counts.get(record["title"], 0) + 1
                records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF whose text layer holds ``lines`` (Helvetica), built by hand."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def write_mixed_corpus(folder: Path) -> dict[str, Path]:
    """A folder with one file of each kind ragdec reads, and one of each kind it skips."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "jsonl": write_jsonl(folder / "squad.jsonl", sample_records(3)),
        "txt": folder / "lighthouse.txt",
        "md": folder / "notes" / "garden.md",
        "pdf": folder / "report.pdf",
        "empty": folder / "empty.txt",
        "binary": folder / "image.txt",
        "latin1": folder / "latin1.txt",
        "huge_line": folder / "minified.md",
        "bad_pdf": folder / "broken.pdf",
        "ignored": folder / "program.py",
    }
    files["txt"].write_text(
        "The old lighthouse on Skerry Point was built in 1871 from granite quarried on the island.\n\n"
        "Its keeper, Agnes Moray, kept the lamp burning for forty-one years.\n", encoding="utf-8")
    files["md"].parent.mkdir(exist_ok=True)
    files["md"].write_text(
        "# Kitchen garden\n\nTomatoes want six hours of sun; basil is planted between them to keep pests away.\n",
        encoding="utf-8")
    files["pdf"].write_bytes(minimal_pdf(["The tidal observatory recorded a surge of 3.2 metres in 1953."]))
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    files["latin1"].write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    files["huge_line"].write_text("x" * 250_000, encoding="utf-8")
    files["bad_pdf"].write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    files["ignored"].write_text("print('not indexed')\n", encoding="utf-8")
    return files


def memory_target(folder: Path):
    """A Qdrant ``:memory:`` target whose collection is the folder's own: a name made from
    its whole path, since tests of one process share the registry of in-memory collections."""
    from ragdec.retrieval.qdrant_store import MEMORY, QdrantTarget

    return QdrantTarget(MEMORY, f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}")


@pytest.fixture(params=["faiss", "qdrant"])
def store_backend(request):
    """Where a test's store keeps its passages: ``store_backend(folder)`` is what to pass as
    ``qdrant=`` to ``build`` or ``Retriever.open_for_writing``: None (FAISS in the folder),
    or a Qdrant ``:memory:`` collection of the folder's own."""
    return (lambda folder: None) if request.param == "faiss" else memory_target
