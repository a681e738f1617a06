"""Every method registered as lossless gives greedy's output token for token, on both tiny
random models, over many prompts, with references to copy from and stop strings to cross.

Registering a method with ``lossless=True`` is enough to be covered here. A method that
needs something set up on a tiny model (a little model to draft, an exit adapter) gets
its options from SETUPS; one not named there runs with its defaults.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from helpers import noisy_copy, random_prompts
from ragdec.decoding.generator import Generator, TextChunk
from ragdec.decoding.methods import LOSSLESS_METHODS, GenerationParams, registered_methods
from ragdec.decoding.seam import Drafter

registered_methods()  # the built-in modules register their methods on import
PROMPTS = 16
MAX_NEW_TOKENS = 24


def little_model(generator: Generator, tmp_path) -> dict:
    """BiLD: a noisy copy of the model drafts for it, however unsure (a tiny model's flat
    logits never reach the default fallback threshold), four tokens at most."""
    little = Generator(noisy_copy(generator.model, noise=0.2), generator.tokenizer, "tiny-little")
    return {"draft_model": little, "fallback_threshold": 0.0, "max_draft": 4}


def random_exit_adapter(generator: Generator, tmp_path) -> dict:
    """FREE: exit after the first of the two layers through a random adapter, so that the
    exit head often disagrees with the deep model; any confidence exits, six at most."""
    from safetensors.torch import save_file

    from ragdec.decoding.free import exit_adapter

    torch.manual_seed(1)
    adapter = exit_adapter(generator.model.config.hidden_size, rank=8)
    with torch.no_grad():
        adapter.up.weight.normal_(0, 3.0)
    path = tmp_path / "layer1.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in adapter.state_dict().items()}, str(path))
    return {"exit_layer": 1, "exit_threshold": 0.0, "adaptive": False, "max_stack": 6, "adapter": str(path)}


# method -> its options on a tiny model (from the model and a scratch folder)
SETUPS = {"bild-lossless": little_model, "free-lossless": random_exit_adapter}
# lossless methods that propose nothing (pid answers a lone request as greedy does)
NO_DRAFTS = {"greedy", "pid"}


def with_some_tokens_replaced(generator: Generator, token_ids, rng: random.Random) -> str:
    """The text of ``token_ids`` with every fifth token replaced: a reference that a copy
    follows for a while and then leaves."""
    ids = [rng.randrange(2, len(generator.tokenizer)) if i % 5 == 4 else t for i, t in enumerate(token_ids)]
    return generator.decode_text(ids)


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    stop: tuple[str, ...]  # one stop string on every third prompt, from inside greedy's answer
    references: list[str]  # greedy's answer, whole and with tokens replaced
    expected: TextChunk  # greedy's whole answer under ``stop``


@pytest.fixture(scope="module")
def cases(tiny_generator) -> list[Case]:
    """The prompts with greedy's answers, decoded once per model for every method."""
    rng = random.Random(0)
    cases = []
    for i, prompt in enumerate(random_prompts(len(tiny_generator.tokenizer), PROMPTS, seed=1)):
        plain = tiny_generator.generate(prompt, GenerationParams(MAX_NEW_TOKENS))
        stop = (plain.text[5:7],) if i % 3 == 2 and len(plain.text) > 7 else ()
        expected = tiny_generator.generate(prompt, GenerationParams(MAX_NEW_TOKENS, stop)) if stop else plain
        references = [plain.text, with_some_tokens_replaced(tiny_generator, plain.token_ids, rng)]
        cases.append(Case(prompt, stop, references, expected))
    return cases


@pytest.fixture
def generator(tiny_generator, monkeypatch):
    """The session's tiny model; what methods keep on it (adapters, fitted thresholds,
    past answers) is put back as it was afterwards."""
    from ragdec.decoding import llma
    from ragdec.decoding.cost import ForwardCost

    # LLMA sizes its drafts by the machine's measured forward cost, on which a tiny model's
    # fixed per-forward overhead can make every draft look too dear: a curve on which long
    # drafts pay keeps the copy path drafting on any machine
    monkeypatch.setattr(llma, "forward_cost", lambda model, name: ForwardCost(tuple(1.0 + 0.01 * k for k in range(17))))
    kept = dict(tiny_generator.method_state)
    yield tiny_generator
    tiny_generator.method_state.clear()
    tiny_generator.method_state.update(kept)


@pytest.mark.parametrize("method", sorted(LOSSLESS_METHODS))
def test_lossless_method_equals_greedy(generator, cases, method, tmp_path):
    setup = SETUPS.get(method)
    options = setup(generator, tmp_path) if setup else {}
    accepted = 0
    for i, case in enumerate(cases):
        ours = generator.generate(case.prompt, GenerationParams(MAX_NEW_TOKENS, case.stop, method, options), case.references)
        expected = case.expected
        assert (ours.token_ids, ours.text, ours.finish_reason) == (expected.token_ids, expected.text, expected.finish_reason), f"prompt {i}"
        accepted += ours.stats.accepted_tokens
    if method not in NO_DRAFTS:
        # drafts were made, verified, and some stood (that rejected ones are cut right is
        # each method's own test: on tiny-qwen2, which repeats one token, all drafts stand)
        assert accepted > 0, f"no draft of {method} stood: its copy path went untested"


@pytest.mark.parametrize("method", sorted(LOSSLESS_METHODS))
def test_drafter_fills_the_contract(generator, method, tmp_path):
    """What the loop reads from a drafter besides its drafts (its own target, its forwards,
    a cost curve) is declared on ``Drafter``, which every method's drafter subclasses: the
    loop reads those attributes and never probes for them."""
    setup = SETUPS.get(method)
    options = setup(generator, tmp_path) if setup else {}
    drafter, _ = registered_methods()[method](generator, [5, 6, 7], [], GenerationParams(8, (), method, options))
    assert Drafter in type(drafter).__mro__
    assert isinstance(drafter.forward_passes, int)
    assert (drafter.target is not None) == method.startswith("free")  # FREE verifies on its shallow-deep model
