"""The OpenAI chat-completions schema: requests in, responses and stream events out.

Pure functions over dicts, so the schema is testable without a server. What ragdec adds
(sources, cache outcome, decoding stats) travels in a top-level ``"ragdec"`` object that
OpenAI clients keep as an extra field (``response.model_extra["ragdec"]`` in the ``openai``
package) and otherwise ignore.

Sampling: ragdec decodes greedily (its copy decoders are lossless only then). A request's
``temperature``, ``top_p``, penalties and ``seed`` are accepted, since chat clients send
them by default, and listed under ``ragdec.ignored`` when they would have changed a
sampled answer; ``n`` > 1 returns n copies of the one greedy answer.

A body is bytes before it is a dict: ``parse_body`` refuses, with a 400, what would make
parsing costly or a later step fail (deep nesting, numbers of thousands of digits, lone
UTF-16 surrogates), in time linear in the body.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from array import array
from itertools import accumulate
from dataclasses import dataclass, field
from typing import Any, Sequence

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.prompts import RequestError, split_messages
from ragdec.pipelines.types import Chunk, Request

MAX_N = 16  # copies of one greedy answer; more is a client bug
MAX_STOP = 4  # as OpenAI
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# an OpenAI chat body nests 5 deep (body, messages, a message, its content parts, a part);
# 32 leaves room for clients' extra fields, far below what Python's parser recurses to
MAX_JSON_DEPTH = 32
# a 64-bit integer has 19 digits and a double's shortest form at most 24 characters; a
# longer number is a mistake or an attack (int() refuses 4,300 digits, with a ValueError)
MAX_NUMBER_CHARS = 40

# What one connection may take by default (``ragdec serve``'s flags; here rather than in
# server.py so that the command line shows them without importing FastAPI):
# the request limits (ragdec/pipelines/limits.py) allow 200,000 characters of text, at
# most 800 KB as UTF-8; JSON's framing around them is small
DEFAULT_MAX_BODY_KB = 1024
# headers' end to body's end: 1 MB in 30 s is 270 kbit/s, slower than any working link
DEFAULT_BODY_TIMEOUT = 30.0
# a connection's start (or a next request's first byte) to the end of its headers; real
# clients send their headers in one packet
DEFAULT_HEADER_TIMEOUT = 10.0


class ApiError(Exception):
    """A request the server refuses, with its OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers  # e.g. Retry-After on a 429
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatCall:
    """A validated chat-completions request."""

    request: Request  # what the pipeline answers (one; n copies are made of its answer)
    model: str
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last event with the usage
    ignored: tuple[str, ...] = ()  # sampling fields that greedy decoding left unused
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


# ---- request bodies ---------------------------------------------------------------------

_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone; linear: only the last quote can fail
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape, maybe half of a pair
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadNumber(ValueError):
    """A number the body may not hold (raised from inside ``json.loads``)."""


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text ``raw``, counted without parsing (so
    without recursion) in passes at C speed: escaped backslashes and quotes go, then the
    strings between the remaining quotes, and the brackets left are summed as +1 / -1.

    Example: ``{"a": [1, {"b": "[[["}]}`` -> 3 (the brackets in the string do not count; nor
    would an escaped quote in it end the string early).
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    if len(brackets) <= 1:
        return len(brackets)
    return max(accumulate(array("b", brackets.translate(_BRACKET_STEPS))))


def _number(convert):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _BadNumber(f"the body holds a number of {len(text):,} characters, over the limit of {MAX_NUMBER_CHARS}")
        return convert(text)

    return parse


def _no_constant(name: str):
    raise _BadNumber(f"the body holds {name}, which is not JSON: send numbers")


def lone_surrogate_path(value: Any) -> str | None:
    """The parameter (``messages.[0].content``) of the first string or key in ``value``
    that holds a lone UTF-16 surrogate, or None; walked with a stack, not recursion.

    Example: ``lone_surrogate_path({"messages": [{"content": "hi \\ud800"}]})`` ->
    ``"messages.[0].content"``.
    """
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path or "(the body)"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                if shown != key:
                    return f"{path}.{shown}" if path else shown
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def parse_body(raw: bytes) -> Any:
    """A request body's JSON. Refused with a 400 (code "invalid_json", or "invalid_unicode"
    naming the parameter): text that is not UTF-8 JSON, nesting deeper than
    ``MAX_JSON_DEPTH``, a number longer than ``MAX_NUMBER_CHARS``, NaN or Infinity, and a
    string with a lone surrogate (``"\\ud800"`` parses, but no text can be encoded with it:
    the cache key, the tokenizer and the response would fail on it later). The depth is
    counted before parsing, so parsing never recurses far; every step is linear.

    Example: ``parse_body(b'{"max_tokens": 1' + b'0' * 5000 + b'}')`` -> ApiError 400, "the
    body holds a number of 5,001 characters, over the limit of 40".
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the body is not UTF-8 ({error}): send JSON in UTF-8", None, "invalid_json") from None
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests arrays and objects {depth:,} deep, over the limit of {MAX_JSON_DEPTH}",
                       None, "invalid_json")
    try:
        body = json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_no_constant)
    except _BadNumber as error:
        raise ApiError(400, str(error), None, "invalid_json") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error}): send a JSON object", None, "invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):  # else no string can hold a surrogate: skip the walk
        path = lone_surrogate_path(body)
        if path is not None:
            raise ApiError(400, f"'{path}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                           "send valid Unicode text", path, "invalid_unicode")
    return body


# ---- requests ---------------------------------------------------------------------------


def _text(content: Any, i: int) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}]: ragdec models read text only, not {kind!r} parts", f"messages.[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages.[{i}].content")


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content", f"messages.[{i}]")
        role = message.get("role")
        if role in ("tool", "function"):
            raise ApiError(400, f"messages[{i}]: ragdec has no tool calling; send system, user and assistant messages", f"messages.[{i}].role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant (got {role!r})", f"messages.[{i}].role")
        messages.append({"role": ROLES[role], "content": _text(message.get("content"), i)})
    try:
        split_messages(messages)  # the pipeline's own rules: the last message is the user's question, ...
    except RequestError as error:
        raise ApiError(400, str(error), "messages") from error
    return messages


def _int(body: dict, name: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"'{name}' must be an integer {bound} (got {value!r})", name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    return tuple(stops)


def _ignored(body: dict) -> tuple[str, ...]:
    """The sampling fields whose values would have made a sampled answer differ from greedy."""
    neutral = {"temperature": 0, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
    ignored = [name for name, value in neutral.items() if body.get(name) not in (None, value)]
    if body.get("seed") is not None:
        ignored.append("seed")
    return tuple(ignored)


def parse_chat(body: Any, served_model: str, defaults: GenerationParams, context_length: int | None = None) -> ChatCall:
    """Validate a chat-completions body.

    Args:
        served_model: the one model this server answers with; another name is a 404.
        defaults: the server's generation params (method, max_new_tokens, knobs).
        context_length: the model's context, the bound of ``max_tokens``.

    Raises:
        ApiError: what is wrong, with the field (``param``) to fix.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter (GET /v1/models lists it)", "model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist here: this server answers with {served_model!r}", "model", "model_not_found")
    messages = _messages(body.get("messages"))
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported: ragdec models answer in text, without tool calling", name)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported by ragdec's decoders", "logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _int({"max_tokens": max_tokens}, "max_tokens", defaults.max_new_tokens, 1, context_length)
    n = _int(body, "n", 1, 1, MAX_N)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    extra = body.get("ragdec") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "'ragdec' must be an object: {\"method\": ..., \"references\": [...]}", "ragdec")
    method = extra.get("method", defaults.method)
    references = extra.get("references", [])
    if not isinstance(method, str) or not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ApiError(400, "'ragdec.method' must be a string and 'ragdec.references' a list of strings", "ragdec")
    params = GenerationParams(max_new_tokens=max_tokens, stop=_stop(body.get("stop")), method=method, options=defaults.options)
    return ChatCall(
        Request(messages, tuple(references), params), model, n, stream,
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        ignored=_ignored(body),
    )


def error_from_chunk(chunk: Chunk) -> ApiError:
    """The 4xx for a request the pipeline refused (its last chunk, finish_reason "error"),
    or a 502 when its engine failed (a remote server unreachable, erring, cut off)."""
    message = chunk.info.error if chunk.info and chunk.info.error else "the pipeline could not answer this request"
    if chunk.info and chunk.info.engine_failed:
        return ApiError(502, message, None, "engine_failed", "server_error")
    if "prompt limit" in message or "context" in message:
        return ApiError(400, message, "messages", "context_length_exceeded")
    if "decoding method" in message:
        return ApiError(400, message, "ragdec.method")
    return ApiError(400, message, "messages")


# ---- responses --------------------------------------------------------------------------


def ragdec_extra(call: ChatCall, last: Chunk, queue_seconds: float) -> dict:
    """ragdec's figures for a request: sources, cache outcome, timings, decoder stats."""
    extra = last.info.as_dict() if last.info else {}
    extra.pop("error", None)
    extra.pop("engine_failed", None)
    extra["stats"] = last.stats.as_dict() if last.stats else None
    extra["queue_s"] = round(queue_seconds, 4)
    extra["ignored"] = list(call.ignored)
    return extra


def usage(call: ChatCall, last: Chunk) -> dict:
    """OpenAI's usage; completion tokens count every choice, as OpenAI does (the n copies
    were decoded once: ``ragdec.stats`` has what ran)."""
    prompt = last.stats.prompt_tokens if last.stats else 0
    completion = (last.stats.new_tokens if last.stats else 0) * call.n
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(call: ChatCall, text: str, last: Chunk, queue_seconds: float) -> dict:
    """The whole answer as a ``chat.completion`` object."""
    choice = {"message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason, "logprobs": None}
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "choices": [{"index": i, **choice} for i in range(call.n)],
        "usage": usage(call, last),
        "system_fingerprint": None,
        "ragdec": ragdec_extra(call, last, queue_seconds),
    }


def chunk_event(call: ChatCall, choices: Sequence[dict], **extra) -> str:
    """One server-sent event of a ``chat.completion.chunk``."""
    body = {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
            "system_fingerprint": None, "choices": list(choices), **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def delta_events(call: ChatCall, chunk: Chunk, first: bool) -> list[str]:
    """The events of one pipeline chunk, one per choice (the n copies of the answer)."""
    events = []
    for i in range(call.n):
        delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        if chunk.text or first:
            events.append(chunk_event(call, [{"index": i, "delta": delta, "finish_reason": None, "logprobs": None}]))
    return events


def final_events(call: ChatCall, last: Chunk, queue_seconds: float) -> list[str]:
    """Each choice's finish, ragdec's figures on the last, the usage when asked, then [DONE]."""
    extra = ragdec_extra(call, last, queue_seconds)
    events = []
    for i in range(call.n):
        choice = {"index": i, "delta": {}, "finish_reason": last.finish_reason, "logprobs": None}
        events.append(chunk_event(call, [choice], **({"ragdec": extra} if i == call.n - 1 else {})))
    if call.include_usage:
        events.append(chunk_event(call, [], usage=usage(call, last)))
    events.append("data: [DONE]\n\n")
    return events


def error_event(error: ApiError) -> str:
    """An error after the stream began (the status line is already sent)."""
    return f"data: {json.dumps(error.body)}\n\n"
