"""Lookup with the real fallback embedder (all-minilm-l6-v2 from the zoo), real SQLite or
PostgreSQL and FAISS: exact, semantic, near and miss; invalidation; near hits as lossless LLMA references;
calibration on question pairs made from the StackFAQ sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_fixtures import DATA, cache, embedder  # noqa: F401 - fixtures
from ragdec.cache import calibration
from ragdec.cache.faq import read_faq
from ragdec.cache.lookup import DEFAULT_POLICIES, Candidate, Policy, QACache, assess, decide
from ragdec.cache.store import HUMAN, Entry, NewEntry
from ragdec.decoding.methods import GenerationParams

MODEL = "qwen2.5-coder-0.5b-instruct"
# a policy fixed here, so that the tests do not move when the shipped calibration does
POLICY = Policy(semantic_threshold=0.80, near_threshold=0.55, guard="paraphrase")


def test_exact_semantic_near_and_miss(cache):
    cache.put("How do I get rid of a double chin?", "Lose weight overall; chin exercises help little.", model=MODEL)
    cache.put("How do I lose 5 kg in a week?", "You cannot safely lose 5 kg in a week; aim for 0.5 to 1 kg.", model=MODEL)

    exact = cache.lookup("how do I get rid of a double chin", model=MODEL, policy=POLICY)
    assert (exact.outcome, exact.answer, exact.score) == ("exact", "Lose weight overall; chin exercises help little.", 1.0)

    semantic = cache.lookup("How can you get rid of double chins", model=MODEL, policy=POLICY)
    assert semantic.outcome == "semantic" and semantic.served
    assert semantic.answer.startswith("Lose weight") and semantic.score >= 0.80

    near = cache.lookup("How do I lose 10 kg in a week?", model=MODEL, policy=POLICY)
    assert near.outcome == "near" and not near.served and near.answer is None
    assert near.references == ("You cannot safely lose 5 kg in a week; aim for 0.5 to 1 kg.",)
    assert near.reason == "guard: numbers differ: 10 vs 5"

    miss = cache.lookup("Who painted the Mona Lisa?", model=MODEL, policy=POLICY)
    assert miss.outcome == "miss" and miss.references == () and "below" in miss.reason

    assert cache.store.stats().hits == 2  # the exact and the semantic hit


def test_entries_of_another_model_or_store_version_never_hit(cache):
    cache.put("What does the retention policy say?", "Ninety days.", model=MODEL, store_version="3")
    for model, version in [("another-model", "3"), (MODEL, "4")]:
        assert cache.lookup("What does the retention policy say?", model=model, store_version=version, policy=POLICY).outcome == "miss"
        assert cache.lookup("what does the retention policy say", model=model, store_version=version, policy=POLICY).outcome == "miss"
    assert cache.lookup("What does the retention policy say?", model=MODEL, store_version="3", policy=POLICY).outcome == "exact"


def test_curated_answers_serve_any_model_and_can_be_asked_for_alone(cache):
    cache.put("How do I reset my password?", "Use the Forgot password link.", model=HUMAN)
    cache.put("How do I change my password?", "Settings, then Security.", model=MODEL)
    hit = cache.lookup("How do I reset my password", model="any-model", policy=POLICY)
    assert hit.outcome == "exact" and hit.answer == "Use the Forgot password link."
    curated = cache.similar("How can I change my password?", model=MODEL, policy=POLICY, curated_only=True)
    assert curated.entry_id != cache.store.exact("How do I change my password?", MODEL).id


def test_uncalibrated_embedder_serves_exact_hits_only(cache, embedder):
    cache.put("What is WAL?", "Write-ahead logging.", model=MODEL)
    assert embedder.info.name in DEFAULT_POLICIES
    custom = QACache(cache.store, embedder)
    custom.save_policy("pairs", Policy(2.0, 2.0))
    assert custom.lookup("What is WAL mode?", model=MODEL).reason.startswith("semantic lookup is off")
    assert custom.lookup("what is wal", model=MODEL).outcome == "exact"


def test_margin_counts_only_entries_with_another_answer():
    def entry(i, answer):
        return Entry(i, f"q{i}", answer, HUMAN, "", "", 0.0, 0.0, 0, None, answer)

    candidates = [Candidate(entry(1, "A"), 0.81), Candidate(entry(2, "A"), 0.79), Candidate(entry(3, "B"), 0.62)]
    assessment = assess("Removing my account", candidates, "specifics")
    assert assessment.margin == pytest.approx(0.19)
    strict = Policy(semantic_threshold=0.5, near_threshold=0.3, margin=0.25, guard="specifics")
    lookup = decide(strict, assessment)
    assert lookup.outcome == "near" and lookup.references == ("A", "B")
    assert decide(Policy(0.5, 0.3, margin=0.1, guard="specifics"), assessment).outcome == "semantic"


def test_near_hit_references_make_llma_copy_and_stay_lossless(cache, smollm2):
    answer = "The capital of France is Paris. Paris is also the largest city in France."
    cache.put("What is the capital of France?", answer, model=smollm2.name)
    near = cache.lookup("What is the capital of France in 1800?", model=smollm2.name, policy=POLICY)
    assert near.outcome == "near" and near.references == (answer,)
    prompt = smollm2.prompt_ids(f"Related answer: {answer}\nWhat is the capital of France in 1800?")
    greedy = smollm2.generate(prompt, GenerationParams(max_new_tokens=24))
    llma_params = GenerationParams(max_new_tokens=24, method="llma", options={"copy_k": 8})  # fixed k: no cost-model timing
    llma = smollm2.generate(prompt, llma_params, references=list(near.references))
    assert llma.token_ids == greedy.token_ids  # lossless: the references only speed it up
    assert llma.stats.forward_passes <= greedy.stats.forward_passes


def stackfaq_pairs(embedder) -> list[calibration.Pair]:
    """The first 5 paraphrases of each thread of the StackFAQ sample, each with its own
    thread's question (a duplicate) and with the question of the other thread it is closest
    to (a hard non-duplicate, as "How do I strikethrough text in Gmail?" is to
    "Strikethrough with GitHub Markdown")."""
    threads = read_faq(DATA / "faq" / "stackfaq.jsonl")
    questions = [thread.question for thread in threads]
    asked = [(paraphrase, own) for own, thread in enumerate(threads) for paraphrase in thread.paraphrases[:5]]
    similarity = embedder.embed_questions([paraphrase for paraphrase, _ in asked]) @ embedder.embed_questions(questions).T
    similarity[np.arange(len(asked)), [own for _, own in asked]] = -np.inf
    closest_other = similarity.argmax(axis=1)
    duplicates = [calibration.Pair(questions[own], paraphrase, True) for paraphrase, own in asked]
    return duplicates + [calibration.Pair(questions[other], paraphrase, False) for (paraphrase, _), other in zip(asked, closest_other)]


def test_calibration_on_stackfaq_pairs_and_the_plot(tmp_path, embedder):
    sample = stackfaq_pairs(embedder)
    a, b = calibration.pair_vectors(embedder, sample)
    scores = (a * b).sum(axis=1)
    duplicate = np.array([p.duplicate for p in sample])
    n_non = int((~duplicate).sum())
    guard = calibration.guard_passes(sample)
    result = calibration.calibrate_pairs(scores, duplicate, guard, target_false_hit_rate=0.10)
    threshold = result.policy.semantic_threshold
    served = guard & (scores >= threshold)
    assert result.false_hit_rate == (served & ~duplicate).sum() / n_non
    assert result.false_hit_upper <= 0.10
    assert result.policy.near_threshold <= threshold
    # without the guard the hard non-duplicates set the threshold, above the near band, and
    # it is the lowest safe one (to the 4 decimals it is kept to): one more non-duplicate
    # below it breaks the bound
    unguarded = calibration.calibrate_pairs(scores, duplicate, np.ones_like(guard), target_false_hit_rate=0.10)
    threshold_unguarded = unguarded.policy.semantic_threshold
    assert threshold_unguarded > unguarded.policy.near_threshold and unguarded.false_hit_rate > 0
    assert unguarded.false_hit_upper <= 0.10
    within_rounding = int((~duplicate & (scores >= threshold_unguarded - 1e-4)).sum())
    assert within_rounding < n_non and calibration.wilson_upper(within_rounding + 1, n_non) > 0.10
    # the decision a lookup makes agrees with the arrays calibration sweeps
    for pair, score, passes in zip(sample, scores, guard):
        stored = Entry(1, pair.a, "answer", MODEL, "", "", 0.0, 0.0, 0, None, "h")
        lookup = decide(result.policy, assess(pair.b, [Candidate(stored, float(score))], "paraphrase"))
        assert lookup.served == bool(passes and score >= result.policy.semantic_threshold)
    png = calibration.plot_calibration(result, tmp_path / "calibration.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result.report())  # the report is plain JSON


def test_wilson_upper_bound():
    assert calibration.wilson_upper(8, 2000) == pytest.approx(0.0070, abs=2e-4)
    assert calibration.wilson_upper(19, 2000) == pytest.approx(0.0136, abs=2e-4)
    assert calibration.wilson_upper(0, 0) == 1.0


def test_put_many_with_vectors_and_bad_shapes(cache, embedder):
    entries = [NewEntry(f"question {i}", f"answer {i}", MODEL) for i in range(3)]
    vectors = embedder.embed_questions([e.question for e in entries])
    ids = cache.put_many(entries, vectors, batch=2)
    assert len(ids) == 3 and len(cache.store) == 3
    with pytest.raises(ValueError, match=r"vectors must be \[1, 384\]"):
        cache.store.put(entries[:1], vectors[:, :10])
    with pytest.raises(ValueError, match="unknown guard"):
        Policy(0.5, 0.5, guard="vibes")
