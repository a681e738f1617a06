"""Cache lookup: exact hit, semantic hit, near hit (references for the LLMA decoder), miss.

The key is the user's question, never the assembled RAG prompt: two prompts that share
the same retrieved passages are near-identical text whatever was asked, which is how
prompt-keyed semantic caches serve the answer to another question.

1. Exact: the same normalized question, answered by the same model over the same store
   version (or a curated FAQ answer), not expired: serve it. No embedding is computed.
2. Semantic: the nearest valid entry scores at least ``policy.semantic_threshold`` (and
   beats the nearest entry with another answer by ``policy.margin``), and the guard finds
   nothing that decides the answer differing: serve it, marked as such.
3. Near: matches at or above ``policy.near_threshold`` that are not safe to serve: their
   answers go back as references; the LLMA decoder answers afresh and copies the spans
   that still fit, which is lossless (the output is what greedy decoding would write).
4. Miss: nothing close.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

from .guard import GUARDS, Verdict
from .store import HUMAN, EmbedderIdentity, Entry, NewEntry, QAStore

# MiniLM rather than E5: on StackFAQ paraphrases it serves more right answers with fewer
# wrong ones than multilingual-e5-small, and both keep held-out Quora false hits within the
# target (bench/results/cache.json: ``stackfaq`` and ``alternatives``). E5 remains the
# choice for questions not in English.
DEFAULT_CACHE_EMBEDDER = "all-minilm-l6-v2"
CANDIDATES = 16  # nearest entries read per lookup; the valid ones among them are assessed


@dataclass(frozen=True)
class Policy:
    """When a match is served and when it only becomes a reference."""

    semantic_threshold: float  # cosine at or above which a guarded match is served; > 1 serves nothing
    near_threshold: float  # cosine at or above which matches' answers become references
    margin: float = 0.0  # the best must beat the best match with another answer by this much
    guard: str = "paraphrase"  # "paraphrase" (cached answers) | "specifics" (curated FAQ); see guard.py
    near_k: int = 3  # references handed to the decoder at most

    def __post_init__(self):
        if self.guard not in GUARDS:
            raise ValueError(f"unknown guard {self.guard!r}: choose one of {', '.join(GUARDS)}")

    def as_dict(self) -> dict:
        return asdict(self)


# Calibrated on ../shared/data (`ragdec cache calibrate --pairs cache/qqp_pairs.jsonl --faq
# faq/stackfaq.jsonl`): pairs: the lowest threshold whose false hits stay within 1% at 95%
# confidence, not below the score 90% of duplicates reach; faq: the most paraphrases served
# right with wrong ones within 2% and unrelated Quora questions served within 1%, both at 95%
# confidence. Held-out figures in bench/results/cache.json. A cache calibrated on other data
# keeps its own policies in its settings, which take precedence.
DEFAULT_POLICIES: dict[str, dict[str, Policy]] = {
    "all-minilm-l6-v2": {
        "pairs": Policy(semantic_threshold=0.7327, near_threshold=0.7327, guard="paraphrase"),
        "faq": Policy(semantic_threshold=0.4734, near_threshold=0.4734, margin=0.0685, guard="specifics"),
    },
    "multilingual-e5-small": {
        "pairs": Policy(semantic_threshold=0.9256, near_threshold=0.9256, guard="paraphrase"),
        "faq": Policy(semantic_threshold=0.8937, near_threshold=0.8937, margin=0.0162, guard="specifics"),
    },
}

# An embedder nobody calibrated serves exact hits only: its scores mean nothing yet.
UNCALIBRATED = Policy(semantic_threshold=2.0, near_threshold=2.0)


@dataclass(frozen=True)
class Candidate:
    entry: Entry  # a valid stored entry near the question
    score: float  # cosine between the question vectors, in [-1, 1]


@dataclass(frozen=True)
class Assessment:
    """What a policy needs to decide, computed once per question (calibration sweeps it)."""

    candidates: tuple[Candidate, ...]  # valid entries near the question, best first
    margin: float  # best score minus the best score of an entry with another answer (best score when none)
    verdict: Verdict  # the policy's guard on the best candidate

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass(frozen=True)
class Lookup:
    outcome: str  # "exact" | "semantic" | "near" | "miss"
    answer: str | None  # the stored answer when served (exact, semantic); None otherwise
    references: tuple[str, ...]  # near: stored answers of the closest matches, for the LLMA decoder
    score: float  # cosine of the best valid match; 1.0 for exact; 0.0 when none
    entry_id: int | None  # the entry served, or the best match
    matched_question: str | None  # that entry's question
    reason: str  # why: "guard: words differ: money vs tv", "score 0.71 below 0.93", ...

    @property
    def served(self) -> bool:
        return self.outcome in ("exact", "semantic")

    def as_dict(self) -> dict:
        return asdict(self)


def decide(policy: Policy, assessment: Assessment) -> Lookup:
    """The outcome of a lookup under ``policy``.

    Example (paraphrase guard, semantic 0.90, near 0.70): the cache holds "What is the
    function of money?" and is asked "What is the function of a TV?" at cosine 0.93. The
    score clears 0.90 but the guard finds "money vs tv": a near hit, the money answer is a
    reference, and the decoder writes the TV answer itself, copying what fits ("The
    function of ... is to ...").
    """
    best = assessment.best
    if best is None:
        return Lookup("miss", None, (), 0.0, None, None, "nothing cached for this model and store version")
    entry = best.entry
    if best.score >= policy.semantic_threshold:
        if assessment.margin < policy.margin:
            reason = f"margin {assessment.margin:.3f} over another answer below {policy.margin:.3f}"
        elif not assessment.verdict:
            reason = f"guard: {assessment.verdict.reason}"
        else:
            return Lookup("semantic", entry.answer, (), best.score, entry.id, entry.question, f"score {best.score:.3f}")
    else:
        reason = f"score {best.score:.3f} below {policy.semantic_threshold:.3f}"
    references: list[str] = []
    for candidate in assessment.candidates:
        if candidate.score < policy.near_threshold or len(references) >= policy.near_k:
            break
        if candidate.entry.answer not in references:
            references.append(candidate.entry.answer)
    if references:
        return Lookup("near", None, tuple(references), best.score, entry.id, entry.question, reason)
    return Lookup("miss", None, (), best.score, entry.id, entry.question, reason)


def assess(question: str, candidates: Sequence[Candidate], guard: str) -> Assessment:
    """Margin and guard verdict of the best candidate (``candidates`` best first).

    Example: candidates "How do I delete my Facebook account?" (0.81, answer A), its
    imported paraphrase "Removing a FB account" (0.79, answer A), "How do I delete a Trello
    card?" (0.62, answer B): margin = 0.81 - 0.62 = 0.19 (the paraphrase shares A).
    """
    candidates = tuple(candidates)
    if not candidates:
        return Assessment((), 0.0, Verdict(False, "no match"))
    best = candidates[0]
    rival = next((c.score for c in candidates[1:] if c.entry.answer_hash != best.entry.answer_hash), None)
    margin = best.score - rival if rival is not None else best.score
    check = GUARDS[guard]
    matched = best.entry.question if guard == "paraphrase" else f"{best.entry.question}\n{best.entry.answer}"
    return Assessment(candidates, margin, check(question, matched))


class QACache:
    """The QA cache: a ``QAStore`` plus the embedder that keys it and the lookup policies.

    Example::

        cache = QACache.open("qa.sqlite")                 # all-minilm-l6-v2 unless told
        cache.put("What does WAL mode do?", "It lets readers ...", model="qwen2.5-coder-0.5b-instruct")
        hit = cache.lookup("what does WAL mode do", model="qwen2.5-coder-0.5b-instruct")
        hit.outcome, hit.answer                           # ("exact", "It lets readers ...")
        near = cache.lookup("What does journal mode do?", model="qwen2.5-coder-0.5b-instruct")
        near.outcome, near.references                     # ("near", ("It lets readers ...",))
    """

    def __init__(self, store: QAStore, embedder):
        self.store = store
        self.embedder = embedder  # ragdec.retrieval.embedder.Embedder

    @classmethod
    def open(cls, location, embedder=None, create: bool = True, clock=None) -> "QACache":
        """Open the cache at ``location`` (a file, or a ``postgresql://`` URL) with ``embedder``
        (an Embedder, or a zoo name / folder; default: the one recorded in the cache, else
        ``DEFAULT_CACHE_EMBEDDER``). The store opens first, so that a missing cache or an
        unreachable database is reported before a model loads for nothing."""
        from ragdec.retrieval.embedder import Embedder

        store = QAStore.open(location, None, create=create, **({"clock": clock} if clock else {}))
        try:
            if embedder is None or isinstance(embedder, str):
                recorded = store.embedder
                embedder = Embedder(embedder or (recorded["name"] if recorded else DEFAULT_CACHE_EMBEDDER))
            store.use_embedder(EmbedderIdentity(embedder.info.name, embedder.info.version, embedder.info.dimension))
        except BaseException:
            store.close()
            raise
        return cls(store, embedder)

    def close(self) -> None:
        self.store.close()

    @property
    def clock(self):
        return self.store.clock

    # ---- policies -------------------------------------------------------------------------

    def policy(self, kind: str = "pairs") -> Policy:
        """The policy for cached answers ("pairs") or a curated FAQ ("faq"): calibrated in
        this cache for this embedder, else the shipped default for it, else exact hits only."""
        stored = self.store.setting(f"policy.{kind}")
        if stored:
            payload = json.loads(stored)
            if payload.get("embedder_version") == self.embedder.info.version:
                return Policy(**payload["policy"])
        return DEFAULT_POLICIES.get(self.embedder.info.name, {}).get(kind, UNCALIBRATED)

    def save_policy(self, kind: str, policy: Policy, report: dict | None = None) -> None:
        """Keep a calibrated policy in the cache, tied to this embedder's weights."""
        payload = {"embedder_version": self.embedder.info.version, "policy": policy.as_dict(), "report": report or {}}
        self.store.set_setting(f"policy.{kind}", json.dumps(payload))

    # ---- writes ---------------------------------------------------------------------------

    def put(
        self, question: str, answer: str, *, model: str, store_version: str = "", ttl_s: float | None = None,
        source: str = "", vector=None,
    ) -> int:
        """Cache ``answer`` to ``question`` (the user's question, not the prompt); returns its id.
        ``vector``: the question's embedding when the caller has it."""
        vectors = self.embedder.embed_questions([question]) if vector is None else [vector]
        return self.store.put([NewEntry(question, answer, model, store_version, source, ttl_s)], vectors)[0]

    def put_many(self, entries: Sequence[NewEntry], vectors=None, batch: int = 512, progress: bool = False) -> list[int]:
        """Cache many entries, embedding their questions unless ``vectors`` [n, d] are given;
        one transaction per ``batch`` entries."""
        ids: list[int] = []
        starts = range(0, len(entries), batch)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="caching", unit="batch")
        for start in starts:
            part = entries[start : start + batch]
            part_vectors = vectors[start : start + batch] if vectors is not None else self.embedder.embed_questions([e.question for e in part])
            ids += self.store.put(part, part_vectors)
        return ids

    # ---- lookup ---------------------------------------------------------------------------

    def candidates(self, vector, model: str, store_version: str = "", curated_only: bool = False, k: int = CANDIDATES) -> list[Candidate]:
        """Valid entries (this model or curated, this store version or none, not expired;
        curated only when asked) among the ``k`` nearest to ``vector``, best first."""
        found = self.store.search(vector, k)
        entries = self.store.entries([entry_id for entry_id, _ in found])
        now = self.clock()
        return [
            Candidate(entries[entry_id], score)
            for entry_id, score in found
            if entry_id in entries
            and entries[entry_id].valid_for(model, store_version, now)
            and (not curated_only or entries[entry_id].model == HUMAN)
        ]

    def embed(self, question: str):
        """The question's vector: float32 [dimension]."""
        return self.embedder.embed_questions([question])[0]

    def exact(self, question: str, *, model: str, store_version: str = "", count_hit: bool = True) -> Lookup | None:
        """An exact hit, or None. No embedding is computed."""
        entry = self.store.exact(question, model, store_version)
        if entry is None:
            return None
        if count_hit:
            self.store.touch(entry.id)
        return Lookup("exact", entry.answer, (), 1.0, entry.id, entry.question, "same question")

    def similar(
        self,
        question: str,
        *,
        model: str,
        store_version: str = "",
        policy: Policy | str = "pairs",
        vector=None,
        curated_only: bool = False,
        count_hit: bool = True,
    ) -> Lookup:
        """Semantic, near or miss (no exact check): see ``lookup``."""
        policy = self.policy(policy) if isinstance(policy, str) else policy
        if policy.near_threshold > 1 and policy.semantic_threshold > 1:
            return Lookup("miss", None, (), 0.0, None, None, "semantic lookup is off for this embedder: run `ragdec cache calibrate`")
        vector = self.embed(question) if vector is None else vector
        candidates = self.candidates(vector, model, store_version, curated_only)
        result = decide(policy, assess(question, candidates, policy.guard))
        if result.outcome == "semantic" and count_hit:
            self.store.touch(result.entry_id)
        return result

    def lookup(
        self,
        question: str,
        *,
        model: str,
        store_version: str = "",
        policy: Policy | str = "pairs",
        vector=None,
        curated_only: bool = False,
        count_hit: bool = True,
    ) -> Lookup:
        """Exact, semantic, near or miss for ``question`` asked of ``model`` over retrieval
        store ``store_version`` (the store's generation; "" when no retrieval is involved).

        Args:
            policy: a Policy, or "pairs" / "faq" for this cache's (see ``policy``).
            vector: the question's embedding when the caller has it (skips the embedder).
            curated_only: semantic and near hits from curated (FAQ) entries only.
            count_hit: count a served hit (hits, last used): the LRU order depends on it.
        """
        exact = self.exact(question, model=model, store_version=store_version, count_hit=count_hit)
        if exact is not None:
            return exact
        return self.similar(
            question, model=model, store_version=store_version, policy=policy, vector=vector,
            curated_only=curated_only, count_hit=count_hit,
        )

