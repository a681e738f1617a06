"""The default embedder (multilingual-e5-small from the zoo), the LangChain class and the
`ragdec index` command on the shipped sample corpus."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from ragdec.retrieval.embedder import DEFAULT_EMBEDDER, E5_PREFIXES

from retrieval_fixtures import SAMPLE_QUESTIONS, sample_records, write_jsonl


def test_e5_is_the_default_with_its_prefixes(e5, minilm):
    embedder = e5
    assert embedder.info.name == DEFAULT_EMBEDDER == "multilingual-e5-small"
    assert (embedder.info.query_prefix, embedder.info.passage_prefix) == (E5_PREFIXES["query"], E5_PREFIXES["passage"])
    assert embedder.info.dimension == 384 and embedder.info.version.startswith("sha256:")
    assert (minilm.info.query_prefix, minilm.info.passage_prefix) == ("", "")

    text = "The Rhine begins in the Swiss Alps."
    as_query = embedder.embed_queries([text])
    as_passage = embedder.embed_passages([text])
    no_prefix = embedder._encode([text], "", 8, False)
    np.testing.assert_allclose(np.linalg.norm(as_query, axis=1), 1.0, atol=1e-5)
    assert float(as_query[0] @ as_passage[0]) < 0.999 and float(as_passage[0] @ no_prefix[0]) < 0.999  # prefixes matter
    # bfloat16 matmuls (on AMX CPUs) round differently from call to call: compare directions
    assert float(embedder.embed_questions([text])[0] @ as_query[0]) > 0.9999  # query: on both sides
    batched = embedder.embed_passages([text, "Warsaw is the capital of Poland."] * 6)
    assert float(batched[0] @ as_passage[0]) > 0.9999  # a batch gives what one-by-one gives
    assert embedder.embed_passages([]).shape == (0, 384)


def test_e5_question_to_question_similarity(e5):
    embedder = e5
    a, b, c = embedder.embed_questions([
        "How do I reset my password?", "What are the steps to change my password?", "When was the Eiffel Tower built?"])
    assert float(a @ b) > float(a @ c) + 0.05


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, weights):
    """The first 6 paragraphs of each sample article, built through the `ragdec index` parser."""
    from ragdec.app.cli_index import register

    weights(DEFAULT_EMBEDDER)  # the command embeds with the default embedder

    root = tmp_path_factory.mktemp("cli")
    corpus = write_jsonl(root / "sample.jsonl", sample_records(6))
    parser = argparse.ArgumentParser(prog="ragdec")
    register(parser.add_subparsers(dest="command", required=True))
    folder = root / "store"
    args = parser.parse_args(["index", "build", str(corpus), "--store", str(folder), "--quiet",
                              "--json", str(root / "build.json")])
    assert args.func(args) == 0
    return parser, folder, root


def test_cli_build_and_search(sample_store, capsys):
    parser, folder, root = sample_store
    report = json.loads((root / "build.json").read_text())
    assert report["files_indexed"] == 1 and report["passages_added"] >= 42
    assert report["manifest"]["embedder"]["name"] == "multilingual-e5-small"

    for question, gold in SAMPLE_QUESTIONS.items():
        args = parser.parse_args(["index", "search", question, "--store", str(folder), "-k", "3",
                                  "--mode", "hybrid", "--json", str(root / "hits.json")])
        assert args.func(args) == 0
        hits = json.loads((root / "hits.json").read_text())["hits"]
        assert gold in [h["record"] for h in hits], question
    printed = capsys.readouterr().out
    assert " 1. 0.0" in printed and "[" in printed  # rank, fused score, where it came from


def test_cli_errors_say_what_to_do(sample_store, tmp_path):
    parser, folder, _ = sample_store
    args = parser.parse_args(["index", "search", "x", "--store", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match="ragdec index build PATH... --store"):
        args.func(args)
    args = parser.parse_args(["index", "build", str(tmp_path / "missing.txt"), "--store", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        args.func(args)
    args = parser.parse_args(["index", "search", "x", "--store", str(folder), "-k", "0"])
    with pytest.raises(ValueError, match="-k must be at least 1"):
        args.func(args)


def test_langchain_embeddings(e5):
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    from ragdec.retrieval.langchain import RagdecEmbeddings

    embeddings = RagdecEmbeddings(e5)
    assert isinstance(embeddings, Embeddings)
    documents = embeddings.embed_documents(["The Rhine begins in the Swiss Alps.", "Warsaw is in Poland."])
    assert len(documents) == 2 and len(documents[0]) == 384
    query = np.array(embeddings.embed_query("Where is Warsaw?"))
    assert float(query @ e5.embed_queries(["Where is Warsaw?"])[0]) > 0.9999
    store = InMemoryVectorStore.from_texts(["The Rhine begins in the Swiss Alps.", "Warsaw is in Poland."], embeddings)
    assert store.similarity_search("Which river starts in the Alps?", k=1)[0].page_content.startswith("The Rhine")
