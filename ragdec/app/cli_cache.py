"""`ragdec cache stats|clear|calibrate` and `ragdec faq import|ask`.

``register(subparsers)`` adds both subcommands to the main parser; handlers return an exit
code and raise ValueError / FileNotFoundError with advice for user errors.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from .cli_common import DEFAULT_DTYPE, DEFAULT_MODEL, add_dtype_argument, db_path, given, write_json


# ---- cache -----------------------------------------------------------------------------


def cmd_cache_stats(args) -> int:
    from ragdec.cache.store import QAStore

    store = QAStore.open(db_path(args), None, create=False)
    try:
        stats = store.stats()
        policies = {kind: json.loads(store.setting(f"policy.{kind}") or "null") for kind in ("pairs", "faq")}
    finally:
        store.close()
    embedder = stats.embedder["name"] if stats.embedder else "(none yet)"
    print(f"cache      {stats.path}")
    print(f"entries    {stats.entries} ({stats.expired} expired), {stats.hits} hits served, {stats.file_bytes / 1e6:.1f} MB")
    print(f"embedder   {embedder}")
    print(f"size cap   {stats.max_entries or 'none'}")
    for model, count in stats.by_model.items():
        print(f"  model {model}: {count}")
    for kind, payload in policies.items():
        if payload:
            p = payload["policy"]
            print(f"policy {kind}: semantic >= {p['semantic_threshold']}, near >= {p['near_threshold']}, margin {p['margin']}, guard {p['guard']}")
        else:
            print(f"policy {kind}: shipped default for the embedder (not calibrated in this file)")
    if args.json:
        write_json({**stats.as_dict(), "policies": policies}, args.json)
    return 0


def cmd_cache_clear(args) -> int:
    from ragdec.cache.store import QAStore

    store = QAStore.open(db_path(args), None, create=False)
    try:
        if args.max_entries is not None:
            before = len(store)
            store.set_max_entries(args.max_entries or None)
            print(f"size cap {args.max_entries or 'removed'}; evicted {before - len(store)} least recently used")
            return 0
        deleted = store.clear(model=args.model, expired_only=args.expired)
    finally:
        store.close()
    what = "expired entries" if args.expired else f"entries of model {args.model}" if args.model else "entries (all)"
    print(f"deleted {deleted} {what} from {store.location}")
    return 0


def cmd_cache_calibrate(args) -> int:
    from ragdec.cache import calibration
    from ragdec.cache.lookup import QACache

    pairs = calibration.read_pairs(args.pairs)
    cache = QACache.open(db_path(args), args.embedder)
    try:
        print(f"embedding {len(pairs)} pairs with {cache.embedder.info.name} ...", file=sys.stderr)
        a, b = calibration.pair_vectors(cache.embedder, pairs, progress=True)
        result = calibration.calibrate_pairs(
            (a * b).sum(axis=1), [p.duplicate for p in pairs], calibration.guard_passes(pairs),
            **given(target_false_hit_rate=args.target_false_hit_rate),
        )
        report = {"pairs": {**result.report(), "file": str(args.pairs)}}
        cache.save_policy("pairs", result.policy, report["pairs"])
        faq_rows = None
        if args.faq:
            # the pairs' questions stand for what users ask that no FAQ entry answers
            questions = [p.a for p in pairs] + [p.b for p in pairs]
            first = {q: i for i, q in reversed(list(enumerate(questions)))}
            unrelated = list(first)
            vectors = [a[i] if i < len(pairs) else b[i - len(pairs)] for i in (first[q] for q in unrelated)]
            targets = given(target_wrong_rate=args.target_wrong_rate, target_out_of_set_rate=args.target_false_hit_rate)
            faq_result, faq_rows = _calibrate_faq(cache, args.faq, (unrelated, vectors), targets)
            report["faq"] = {**faq_result.report(), "file": str(args.faq)}
            cache.save_policy("faq", faq_result.policy, report["faq"])
        plot = calibration.plot_calibration(
            result, args.plot or _default_plot(db_path(args)), f"QA cache calibration, {cache.embedder.info.name}", faq_rows,
            faq_result.policy if args.faq else None,
        )
        location = cache.store.location
    finally:
        cache.close()
    p = result.policy
    print(
        f"pairs: semantic >= {p.semantic_threshold:.4f} serves {result.hit_rate:.1%} of duplicates, "
        f"{result.false_hit_rate:.2%} of non-duplicates (<= {result.false_hit_upper:.2%} at 95%); near >= {p.near_threshold:.4f}"
    )
    if args.faq:
        f = report["faq"]
        print(
            f"faq: semantic >= {f['policy']['semantic_threshold']:.4f}, margin {f['policy']['margin']:.4f}: "
            f"{f['right_rate']:.1%} right, {f['wrong_rate']:.2%} wrong of {f['queries']} paraphrases; "
            f"{f['out_of_set_rate']:.2%} of {f['out_of_set_queries']} unrelated questions served"
        )
    print(f"saved in {location}; plot {plot}")
    if args.json:
        write_json(report, args.json)
    return 0


def _default_plot(location) -> Path:
    """Next to a cache file; for a database, ``$RAGDEC_HOME/<database>.calibration.png``."""
    from ragdec.cache.backends import is_database_url
    from ragdec.models.home import ragdec_home

    if not is_database_url(location):
        return location.with_suffix(".calibration.png")
    database = urlsplit(location).path.strip("/") or "qa-cache"
    return ragdec_home() / f"{database}.calibration.png"


def _calibrate_faq(cache, faq_path: str, unrelated, targets: dict):
    """Import the FAQ's canonical questions into a scratch cache with the same embedder and
    calibrate on how its paraphrases, and ``unrelated`` (questions, vectors), meet them;
    ``targets``: the rates given (``calibration.calibrate_faq``'s own defaults otherwise)."""
    from ragdec.cache import calibration
    from ragdec.cache.faq import faq_entries, read_faq, score_paraphrases, score_questions
    from ragdec.cache.lookup import QACache
    from ragdec.cache.store import EmbedderIdentity, QAStore

    records = read_faq(faq_path)
    info = cache.embedder.info
    with tempfile.TemporaryDirectory() as scratch:
        store = QAStore.open(Path(scratch) / "faq.sqlite", EmbedderIdentity(info.name, info.version, info.dimension))
        scratch_cache = QACache(store, cache.embedder)
        try:
            scratch_cache.put_many(faq_entries(records, "faq", with_paraphrases=False))
            scores = score_paraphrases(scratch_cache, records, source="faq")
            out_top, out_margin, out_guard, _ = score_questions(scratch_cache, *unrelated)
        finally:
            store.close()
    result = calibration.calibrate_faq(
        scores.top, scores.margin, scores.guard_pass, scores.right, out_of_set=(out_top, out_margin, out_guard), **targets
    )
    rows = calibration.faq_curve(scores.top, scores.margin, scores.guard_pass, scores.right, result.policy)
    return result, rows


# ---- faq -------------------------------------------------------------------------------


def cmd_faq_import(args) -> int:
    from ragdec.cache.faq import import_faq
    from ragdec.cache.lookup import QACache

    cache = QACache.open(db_path(args), args.embedder)
    try:
        report = import_faq(cache, args.file, with_paraphrases=not args.no_paraphrases, progress=True)
    finally:
        cache.close()
    print(f"imported {report.records} questions as {report.entries} entries into {cache.store.location}")
    return 0


def cmd_faq_ask(args) -> int:
    from ragdec.cache.faq import FaqService
    from ragdec.cache.lookup import QACache

    cache = QACache.open(db_path(args), create=False)
    try:
        service = FaqService(cache, args.model or DEFAULT_MODEL, **given(max_new_tokens=args.max_new_tokens),
                             cache_generated=not args.no_cache, dtype=args.dtype or DEFAULT_DTYPE)
        answer = service.ask(args.question)
    finally:
        cache.close()
    print(answer.text)
    lookup = answer.lookup
    how = f"generated by {service.model} with {len(lookup.references)} FAQ references" if answer.generated else f"{lookup.outcome} hit"
    matched = f"; closest: {lookup.matched_question!r} ({lookup.score:.3f}, {lookup.reason})" if lookup.matched_question else ""
    print(f"[{how}{matched}]", file=sys.stderr)
    if args.json:
        write_json({"text": answer.text, "generated": answer.generated, "lookup": lookup.as_dict(), "stats": answer.stats}, args.json)
    return 0


# ---- parser ----------------------------------------------------------------------------


def _add_db(parser) -> None:
    parser.add_argument("--db", help="cache file, or postgresql://USER@HOST/DATABASE (default: $RAGDEC_HOME/qa-cache.sqlite)")


def register(subparsers) -> None:
    """Add `cache` and `faq` to the main parser's subparsers."""
    cache = subparsers.add_parser("cache", help="the QA cache: statistics, clearing, calibration")
    actions = cache.add_subparsers(dest="action", required=True)

    stats = actions.add_parser("stats", help="entries, hits, models, size, policies")
    _add_db(stats)
    stats.add_argument("--json", metavar="PATH", help="write the statistics as JSON")
    stats.set_defaults(func=cmd_cache_stats)

    clear = actions.add_parser("clear", help="delete entries: all, one model's, or the expired ones; or cap the size")
    _add_db(clear)
    which = clear.add_mutually_exclusive_group()
    which.add_argument("--model", help="only this model's answers")
    which.add_argument("--expired", action="store_true", help="only entries past their TTL")
    which.add_argument("--max-entries", type=int, metavar="N", help="keep the N most recently used entries from now on (0: no cap)")
    clear.set_defaults(func=cmd_cache_clear)

    calibrate = actions.add_parser("calibrate", help="pick the semantic-hit threshold and near band from labelled pairs")
    _add_db(calibrate)
    calibrate.add_argument("--pairs", required=True, help='JSON Lines of {"a", "b", "duplicate"}, e.g. ../shared/data/cache/qqp_pairs.jsonl')
    calibrate.add_argument("--faq", help="also calibrate FAQ answering on this file's paraphrases, e.g. ../shared/data/faq/stackfaq.jsonl")
    calibrate.add_argument("--embedder", help="embedder of a new cache (default: the cache's own, else all-minilm-l6-v2)")
    calibrate.add_argument("--target-false-hit-rate", type=float, help="false semantic hits allowed among non-duplicates (default 0.01)")
    calibrate.add_argument("--target-wrong-rate", type=float, help="FAQ: wrong answers allowed among paraphrases (default 0.02)")
    calibrate.add_argument("--plot", help="PNG of threshold against hit and false-hit rates (default: next to the cache)")
    calibrate.add_argument("--json", metavar="PATH", help="write the calibration report as JSON")
    calibrate.set_defaults(func=cmd_cache_calibrate)

    faq = subparsers.add_parser("faq", help="answer from curated FAQ answers, generating when none is safe")
    faq_actions = faq.add_subparsers(dest="action", required=True)
    imp = faq_actions.add_parser("import", help='cache a JSON Lines FAQ: {"question", "answers"[, "paraphrases"]}')
    imp.add_argument("file")
    _add_db(imp)
    imp.add_argument("--embedder", help="embedder of a new cache (default: the cache's own, else all-minilm-l6-v2)")
    imp.add_argument("--no-paraphrases", action="store_true", help="import the canonical questions only")
    imp.set_defaults(func=cmd_faq_import)

    ask = faq_actions.add_parser("ask", help="answer one question")
    ask.add_argument("question")
    _add_db(ask)
    ask.add_argument("--model", help=f"model that answers when no FAQ entry is safe (default {DEFAULT_MODEL})")
    add_dtype_argument(ask, DEFAULT_DTYPE)
    ask.add_argument("--max-new-tokens", type=int, help="most tokens of a generated answer (default 256)")
    ask.add_argument("--no-cache", action="store_true", help="do not cache a generated answer")
    ask.add_argument("--json", metavar="PATH", help="write the answer, the lookup and decoding stats as JSON")
    ask.set_defaults(func=cmd_faq_ask)
