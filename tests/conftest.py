"""Shared fixtures, and the two lanes of the suite.

Tiny random causal LMs serve the fast lane. Real weights come only through the ``weights``
fixture (and those built on it: ``smollm2``, ``minilm``, ``e5``); a browser only through
``browser`` (tests/test_app_browser.py). A test whose fixtures reach one of them is marked
with its name, so that ``-m "not weights and not browser"`` (``make test-fast``) leaves
it out; a test not marked ``weights`` that loads a zoo model anyway fails with the zoo's
RAGDEC_NO_WEIGHTS error, in either lane.
"""

from __future__ import annotations

import os
from typing import Callable

# idle OpenMP threads sleep instead of spinning: test processes share the cores with each
# other (and with the server and browser tests' subprocesses); set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from ragdec.decoding.generator import Generator, configure_threads  # noqa: E402

from helpers import database_for_test, serving  # noqa: E402

configure_threads()

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Retrieval augmented generation copies spans from reference passages into answers.",
    "Question: when was the tower built? Answer: the tower was built in 1889.\n\nDone.",
    "Numbers 0123456789 and punctuation , . ; : ! ? ( ) and accents: café naïve über.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE tokenizer trained in memory on a few sentences (vocab 320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def tiny_causal_lm(arch: str, vocab_size: int, seed: int = 0, hidden_size: int = 48, intermediate_size: int = 88,
                   layers: int = 2):
    """A randomly initialised model, 2 layers by default; odd sizes catch shape bugs."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=arch == "qwen2",
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # random weights give flat logits; a larger scale makes argmax decisions clear-cut so
    # that float noise between 1-token and k-token forwards cannot flip a tie
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 1
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_generator(request, tiny_tokenizer) -> Generator:
    model = tiny_causal_lm(request.param, len(tiny_tokenizer))
    return Generator(model, tiny_tokenizer, name=f"tiny-{request.param}")


# ---- the lanes: markers set by rule, and the guard ------------------------------------------

# a test whose fixtures (with all they depend on) include one of these is marked with its name
MARKING_FIXTURES = ("weights", "browser")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers set here
def pytest_collection_modifyitems(items):
    for item in items:
        for name in MARKING_FIXTURES:
            # the closure of the test's fixtures: what it asks for, what those ask for, ...
            if name in item.fixturenames:
                item.add_marker(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Outside the ``weights`` tests the zoo refuses to load (its fixtures of any scope and
    any subprocess included): a test that loads weights without the fixture fails."""
    from ragdec.models.zoo import NO_WEIGHTS

    if item.get_closest_marker("weights"):
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(NO_WEIGHTS, "1")
        return (yield)


# ---- real weights ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weights() -> Callable[[str], str]:
    """The one door to real weights: ``weights(name)`` prepares zoo model ``name`` (assembled
    on first use, then at once) and returns the name, for whatever loads it by name (a
    Generator, an Embedder, the command line). Tests that use it are marked ``weights``."""
    from ragdec.models import zoo

    def prepared(name: str) -> str:
        zoo.prepare(name, progress=False)
        return name

    return prepared


@pytest.fixture(scope="session")
def smollm2(weights) -> Generator:
    """smollm2-135m-instruct from the zoo (loaded in ~1 s once prepared)."""
    return Generator.load(weights("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def minilm(weights):
    """all-minilm-l6-v2 from the zoo: 6 layers, the fast real embedder of these tests."""
    from ragdec.retrieval.embedder import Embedder

    return Embedder(weights("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def e5(weights):
    """multilingual-e5-small from the zoo: the default embedder."""
    from ragdec.retrieval.embedder import DEFAULT_EMBEDDER, Embedder

    weights(DEFAULT_EMBEDDER)
    return Embedder()


# ---- PostgreSQL: one server for the session, a database per test -------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the session's own (tests/postgres_server.py); its tests skip
    only where the server's binaries are missing, which `make test` installs."""
    from postgres_server import PostgresServer

    yield from serving(PostgresServer.start)


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A new empty database on the session's server, dropped after."""
    yield from database_for_test(postgres, request, "t_")


@pytest.fixture(params=["sqlite", "postgres"])
def qa_location(request, tmp_path):
    """Where a QA cache lives, once per backend: a new SQLite file, a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "qa.sqlite"
    return request.getfixturevalue("postgres_url")
