"""`ragdec index build|search`: build a store folder from files, search it.

    ragdec index build docs/ notes.md --store docs.store
    ragdec index build docs/ --store docs.store --qdrant http://qdrant:6333    # vectors in Qdrant
    ragdec index build docs/ --store docs.store --pgvector postgresql://app@db/rag   # or PostgreSQL
    ragdec index search --store docs.store "how do I rotate the keys?" -k 5 --mode hybrid

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
Errors meant for users are raised as ValueError / FileNotFoundError with what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from .cli_common import given, write_json


def _settings(args, stored: dict | None):
    """The stored settings (or the defaults), with the flags given on this command line."""
    from ragdec.retrieval.persistence import Settings

    settings = Settings(**stored) if stored and not args.rebuild else Settings()
    return dataclasses.replace(settings, **given(
        index_kind=args.index_kind, nprobe=args.nprobe, chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens,
        embed_titles=None if args.embed_titles is None else args.embed_titles == "yes",
    ))


def cmd_index_build(args) -> int:
    from pathlib import Path

    from ragdec.decoding.generator import configure_threads
    from ragdec.retrieval.backends import location
    from ragdec.retrieval.ingest import build
    from ragdec.retrieval.persistence import read_manifest
    from ragdec.retrieval.readers import ReadOptions

    configure_threads()
    store = Path(args.store).expanduser()
    if store.exists() and not store.is_dir():
        raise ValueError(f"--store {store} is a file; give a folder (it is created if missing)")
    target = None  # where the passages go: a QdrantTarget, a PgvectorTarget, or None (FAISS)
    if args.qdrant:
        from ragdec.retrieval.qdrant_store import MEMORY, QdrantTarget

        target = QdrantTarget.for_store(args.qdrant, store, args.collection)
        if target.url == MEMORY:
            print(f"note: --qdrant {MEMORY} keeps the collection in this process only: it is gone when this "
                  "command ends (use it from Python, for tests; give a server URL to keep a store)", file=sys.stderr)
    elif args.collection:
        raise ValueError("--collection names a Qdrant collection: give --qdrant URL with it")
    if args.pgvector:
        from ragdec.retrieval.pgvector_store import PgvectorTarget

        if target is not None:
            raise ValueError("--qdrant and --pgvector each name where the passages go: give one")
        target = PgvectorTarget.for_store(args.pgvector, store, args.table)
    elif args.table:
        raise ValueError("--table names a PostgreSQL table: give --pgvector URL with it")
    manifest = read_manifest(store) if store.is_dir() else None
    settings = _settings(args, manifest.settings if manifest else None)
    options = ReadOptions(**given(
        text_field=args.text_field, title_field=args.title_field, id_field=args.id_field, max_line_chars=args.max_line_chars,
        max_file_bytes=None if args.max_file_mb is None else int(args.max_file_mb * 1024 * 1024),
    ))
    report = build(
        args.paths, store, embedder=args.model, settings=settings, rebuild=args.rebuild,
        read_options=options, progress=not args.quiet, prune=args.prune, qdrant=target,
    )
    print(report.summary(), file=sys.stderr)
    final = read_manifest(store)
    if final is not None:
        print(f"{store}: {final.passages} passages, {final.index['kind']} index, embedder {final.embedder['name']}; "
              f"{location(final.backend)}")
    if args.json:
        payload = dataclasses.asdict(report) | {"passages_per_s": round(report.passages_per_s, 2)}
        write_json(payload | {"store": str(store), "manifest": dataclasses.asdict(final) if final else None}, args.json)
    return 0


def cmd_index_search(args) -> int:
    from ragdec.decoding.generator import configure_threads
    from ragdec.retrieval.retriever import Retriever

    configure_threads()
    if args.k < 1:
        raise ValueError("-k must be at least 1")
    with Retriever.open(args.store, embedder=args.model, nprobe=args.nprobe) as retriever:
        hits = retriever.search(args.query, k=args.k, mode=args.mode)
    if not hits:
        print("no passages found" + (" (BM25 needs a word of the query in a passage)" if args.mode == "bm25" else ""))
    for hit in hits:
        where = ", ".join(x for x in (hit.passage.record, f"chunk {hit.passage.position}") if x)
        print(f"{hit.rank:>2}. {hit.score:.4f}  {hit.title}  [{hit.passage.source}; {where}]")
        text = hit.text if args.full else textwrap.shorten(hit.text, width=args.width, placeholder=" ...")
        print(textwrap.indent(textwrap.fill(text, width=100), "    "))
    if args.json:
        write_json(
            {"query": args.query, "mode": args.mode, "k": args.k,
             "hits": [{"rank": h.rank, "score": h.score} | dataclasses.asdict(h.passage) for h in hits]},
            args.json,
        )
    return 0


def register(subparsers) -> None:
    """Add ``index`` (``build``, ``search``) to an argparse subparsers object."""
    index = subparsers.add_parser("index", help="build and search a document index (E5 + FAISS, Qdrant or pgvector + SQLite)")
    actions = index.add_subparsers(dest="action", required=True)

    build = actions.add_parser(
        "build", help="index files and folders (.txt .md .jsonl .pdf); re-running adds only new or changed files"
    )
    build.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    build.add_argument("--store", required=True, metavar="DIR", help="store folder (created if missing)")
    build.add_argument("--model", help="embedder: zoo name, folder or hub id (default: the store's, "
                       "else multilingual-e5-small)")
    build.add_argument("--rebuild", action="store_true", help="start from an empty store (e.g. to change embedder)")
    build.add_argument("--qdrant", metavar="URL", help="keep vectors and passages in a Qdrant collection that replicas "
                       "share: http(s)://HOST:6333, or :memory: (this process only: tests); for a new store or with "
                       "--rebuild [stored: FAISS in the folder]")
    build.add_argument("--collection", metavar="NAME", help="the Qdrant collection (an alias) [default: the store folder's name]")
    build.add_argument("--pgvector", metavar="URL", help="keep vectors and passages in a PostgreSQL table with pgvector "
                       "(HNSW, full-text search) that replicas share: postgresql://USER@HOST/DATABASE; the manifest "
                       "keeps the URL without its password (other processes: $PGPASSWORD or ~/.pgpass); for a new "
                       "store or with --rebuild [stored: FAISS in the folder]")
    build.add_argument("--table", metavar="NAME", help="the PostgreSQL table [default: the store folder's name]")
    build.add_argument("--prune", action="store_true", help="forget files that vanished from the given folders")
    build.add_argument("--index-kind", choices=("auto", "flat", "ivf"),
                       help="flat (exact) or IVF (approximate); auto: IVF from 50,000 passages [stored: auto]")
    build.add_argument("--nprobe", type=int, help="IVF cells read per query [stored: nlist // 40]")
    build.add_argument("--chunk-tokens", type=int, help="passage length in embedder tokens [stored: 256]")
    build.add_argument("--overlap-tokens", type=int, help="tokens shared by consecutive passages [stored: 32]")
    build.add_argument("--embed-titles", choices=("yes", "no"), help="embed a passage's title with it [stored: no]")
    build.add_argument("--text-field", help="JSON Lines field holding the text (default text)")
    build.add_argument("--title-field", help="JSON Lines field holding the title (default title)")
    build.add_argument("--id-field", help="JSON Lines field naming the record (default id)")
    build.add_argument("--max-line-chars", type=int, help="skip files with a longer line (default 200000)")
    build.add_argument("--max-file-mb", type=float, help="skip larger files (default 50)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument("--json", metavar="PATH", help="write the ingestion report as JSON")
    build.set_defaults(func=cmd_index_build)

    search = actions.add_parser("search", help="print the passages that best match a query, with scores",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    search.add_argument("query")
    search.add_argument("--store", required=True, metavar="DIR", help="store folder built by `index build`")
    search.add_argument("-k", type=int, default=5, help="passages to print")
    search.add_argument("--mode", choices=("dense", "bm25", "hybrid"), default="dense",
                        help="E5 vectors, keywords, or both fused by reciprocal rank")
    search.add_argument("--model", help="embedder (default: the one the store was built with)")
    search.add_argument("--nprobe", type=int, help="IVF cells read per query (IVF stores only)")
    search.add_argument("--full", action="store_true", help="print whole passages")
    search.add_argument("--width", type=int, default=300, help="characters of each passage shown")
    search.add_argument("--json", metavar="PATH", help="write the hits as JSON")
    search.set_defaults(func=cmd_index_search)


if __name__ == "__main__":  # handy before the main CLI wires the command in
    parser = argparse.ArgumentParser(prog="ragdec")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    try:
        sys.exit(parsed.func(parsed))
    except (ValueError, FileNotFoundError) as error:
        print(f"ragdec: error: {error}", file=sys.stderr)
        sys.exit(2)
