"""POST /v1/embeddings in OpenAI's shape, from the embedder the server's store was built with.

E5 embeds every text with a prefix that says what it is (``query: `` or ``passage: ``), and
OpenAI's API has no field for it. The rule here: a request says it with ``input_type``
("query" or "passage", the name Cohere's and Voyage's APIs use), and without it the texts
are embedded as passages, which are the vectors the store holds (``Embedder.embed_passages``
of the same text gives the same vector). A model without prefixes ignores the field.

Example::

    POST /v1/embeddings {"input": ["where does the Rhine begin?"], "input_type": "query"}
    -> {"object": "list", "model": "multilingual-e5-small",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.012, ...]}],
        "usage": {"prompt_tokens": 9, "total_tokens": 9}}
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Sequence

from .openai_api import ApiError

MAX_INPUTS = 256  # texts in one request: a bigger job is an index build, not a request
INPUT_TYPES = ("passage", "query")
ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingCall:
    """A validated embeddings request."""

    texts: tuple[str, ...]  # what to embed, in order
    input_type: str  # "passage" (as the store holds them) | "query"
    encoding_format: str  # "float" | "base64" (little-endian float32, as OpenAI sends it)


def parse_embeddings(body: Any, embedder_name: str, max_inputs: int = MAX_INPUTS) -> EmbeddingCall:
    """Check an embeddings body; a 400 names what is wrong and what to send instead."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with 'input'")
    model = body.get("model")
    if model is not None and model != embedder_name:
        raise ApiError(404, f"the model {model!r} does not embed here: this server embeds with {embedder_name!r}",
                       "model", "model_not_found")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a string or a non-empty list of strings (token ids are not accepted)",
                       "input")
    if len(texts) > max_inputs:
        raise ApiError(400, f"'input' has {len(texts)} texts, over this server's limit of {max_inputs} a request: "
                       "send them in several requests", "input", "too_many_inputs")
    if any(not t.strip() for t in texts):
        raise ApiError(400, "'input' holds an empty text: every text must have some content", "input")
    input_type = body.get("input_type", "passage")
    if input_type not in INPUT_TYPES:
        raise ApiError(400, f"'input_type' must be one of {', '.join(INPUT_TYPES)} (got {input_type!r})", "input_type")
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise ApiError(400, f"'encoding_format' must be one of {', '.join(ENCODINGS)} (got {encoding!r})",
                       "encoding_format")
    if body.get("dimensions") is not None:
        raise ApiError(400, "'dimensions' is not supported: the embedder's vectors have one size", "dimensions")
    return EmbeddingCall(tuple(texts), input_type, encoding)


def token_counts(embedder, texts: Sequence[str], max_tokens: int) -> list[int]:
    """Tokens each text takes with its prefix and the special tokens; a text past what the
    model reads is a 400, since its vector would silently leave the rest out."""
    counts = [len(ids) for ids in embedder.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    prefix = embedder.prefix_tokens() - len(embedder.tokenizer("", add_special_tokens=True)["input_ids"])
    for i, count in enumerate(counts):
        if count + prefix > max_tokens:
            raise ApiError(400, f"input[{i}] is {count + prefix} tokens, over the {max_tokens} the embedder reads: "
                           "cut it into passages (as `ragdec index build` does)", "input", "input_too_long")
    return [count + prefix for count in counts]


def embed(embedder, call: EmbeddingCall) -> list:
    """The vectors of ``call``'s texts, float32 [n, dimension], unit length."""
    if call.input_type == "query":
        return embedder.embed_queries(call.texts)
    return embedder.embed_passages(call.texts)


def embeddings_body(call: EmbeddingCall, model: str, vectors, tokens: Sequence[int]) -> dict:
    """OpenAI's response body for ``vectors`` [n, dimension]."""
    import numpy as np

    data = []
    for i, vector in enumerate(vectors):
        if call.encoding_format == "base64":
            value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        else:
            value = [float(x) for x in vector]
        data.append({"object": "embedding", "index": i, "embedding": value})
    total = int(sum(tokens))
    return {"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": total, "total_tokens": total}}
