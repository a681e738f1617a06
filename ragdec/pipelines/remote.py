"""An engine that answers on an OpenAI-compatible server (vLLM, llama-server, another
`ragdec serve`): retrieval, the QA cache, citations and sources stay in ragdec, the
decoding happens there.

    engine = RemoteEngine("http://10.0.0.5:8000/v1", "Qwen/Qwen2.5-0.5B-Instruct", tokenizer="qwen2.5-coder-0.5b-instruct")
    pipeline = RagPipeline(engine, Retriever.open("docs.store"))

The pipeline builds the chat messages it would template for its own model (system
prompt, the history that fits, numbered passages and the question); this engine posts
them to ``{base_url}/chat/completions``, greedy (temperature 0), streamed as server-sent
events, and yields the text as it comes. Its stats are what a client can know: time to
the first token and tokens per second measured here, with the server's own token counts
(``stream_options.include_usage``), and its draft figures where it reports them
(llama-server's ``timings``, ragdec's ``ragdec.stats``).

Failures, each told in one sentence that names the URL and what to check
(``EngineError``): a connection refused, a 429 or a 503 is retried with exponential
backoff (a Retry-After is honoured, capped); a server that stays silent past the read
timeout, or an answer that runs past the total timeout, ends the request; an error
status carries the server's own message; a connection that drops mid-answer ends that
answer with an error. Nothing is retried once text has come: it was already shown.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from ragdec.decoding.generator import ChatTokenizer, TextChunk
from ragdec.decoding.methods import GenerationParams
from ragdec.decoding.seam import DecodeStats

from .engine import BatchStatus, EngineError
from .prompts import Prompt
from .types import Message

if TYPE_CHECKING:
    import httpx  # imported where used: the command line's flags need this module, not httpx

log = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({429, 503})  # the server is busy or starting: asking again later helps


@dataclass(frozen=True)
class RemoteSettings:
    # the server's context, prompt and answer together: llama-server's default -c is 4096;
    # vLLM's is the model's own (--max-model-len); prompts are fitted to it
    context_length: int = 4096
    timeout_s: float = 600.0  # the whole answer, retries included
    # silence allowed between two pieces of the answer; the first comes after the server
    # reads the prompt, which for a long prompt on a CPU server takes a good part of this
    # (bench/results/qa_remote_overhead.json: ttft_s, the first text of a `ragdec serve` behind it)
    read_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    retries: int = 3  # after a refused connection, a 429 or a 503
    backoff_s: float = 0.5  # the first wait between tries; doubled each time
    max_wait_s: float = 30.0  # the longest wait between tries, a Retry-After included
    stream: bool = True  # server-sent events; False: the whole answer at once (a proxy that buffers streams)
    # send the copyable texts (passages, history, near-hit answers) as "ragdec": {"references": [...]}, which a
    # remote `ragdec serve` copies from (LLMA); llama-server and vLLM ignore the field, OpenAI's API refuses it
    send_references: bool = False


class TokenEstimate:
    """Token counts without the model's tokenizer: one token per 3 bytes of UTF-8, and 4
    for each message's role markers (and 4 for the answer's).

    Conservative for prose: current BPE tokenizers average about 4 bytes of English text
    per token, and a CJK character (3 bytes in UTF-8) is about one token. Text full of
    digits can exceed it (some tokenizers split every digit): the context setting leaves
    room, and a server that refuses a prompt says so.

    ``prompt_ids`` (as ``ChatTokenizer``'s) returns stand-in ids, one per estimated token
    (the 3-byte pieces of the text), so that a prompt's length and its shared prefix are
    measured as with real ids.

    Example: "Where does the Rhine begin?" is 27 bytes -> 9 tokens; as the one user
    message of a chat -> 4 + 9 + 4 (the answer's markers) = 17.
    """

    BYTES_PER_TOKEN = 3
    MARKER_TOKENS = 4  # <|im_start|>role\n ... <|im_end|>\n and their kin
    _ROLES = {"system": -1, "user": -2, "assistant": -3}  # stand-in marker ids, apart from any piece's

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        ids: list[int] = []
        for message in messages:
            ids += [self._ROLES.get(message["role"], -4)] * self.MARKER_TOKENS + self._pieces(message["content"])
        return ids + [self._ROLES["assistant"]] * self.MARKER_TOKENS

    def count_tokens(self, text: str) -> int:
        return -(-len(text.encode("utf-8")) // self.BYTES_PER_TOKEN)

    def _pieces(self, text: str) -> list[int]:
        raw = text.encode("utf-8")
        step = self.BYTES_PER_TOKEN
        return [int.from_bytes(raw[i : i + step], "big") for i in range(0, len(raw), step)]


class RemoteEngine:
    """Answers on the OpenAI-compatible server at ``base_url``.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (what an OpenAI client takes).
        model: the model the server answers with (its ``GET /v1/models`` lists them).
        api_key: sent as ``Authorization: Bearer KEY`` (None: no header).
        tokenizer: a zoo name, local folder or hub id whose tokenizer (loaded without the
            weights) measures prompts exactly as the server's model will, or a ready
            ``ChatTokenizer``; None: ``TokenEstimate``.
        settings: context, timeouts, retries (``RemoteSettings``).
    """

    method = "remote"  # the server decodes its own way: ragdec's router has no say
    answers_groups = False  # each request on its own: the server has no PiD to share a document's prompt
    batches = True  # the server takes concurrent requests and batches them its own way


    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 tokenizer: str | ChatTokenizer | None = None, settings: RemoteSettings | None = None):
        import httpx

        try:
            parsed = httpx.URL(base_url)
            problem = "" if parsed.scheme in ("http", "https") and parsed.host and " " not in base_url else "no host or scheme"
        except httpx.InvalidURL as error:
            problem = str(error)
        if problem:
            raise ValueError(f"the remote engine's URL {base_url!r} is not an http:// or https:// URL with a host "
                             f"({problem}): give the API root, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("the remote engine needs the name of the model its server answers with (GET /v1/models lists them)")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.name = model
        self.settings = settings or RemoteSettings()
        self.context_length = self.settings.context_length
        self.tokens = ChatTokenizer.load(tokenizer) if isinstance(tokenizer, str) else tokenizer or TokenEstimate()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # one pool of connections, shared by every thread that asks (httpx's Client is thread-safe)
        self.client = httpx.Client(headers=headers, limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

    def close(self) -> None:
        self.client.close()

    # ---- the seam ---------------------------------------------------------------------------

    def describe(self) -> dict:
        """What /health shows of it."""
        return {"kind": "remote", "base_url": self.base_url, "model": self.name, "context_length": self.context_length,
                "tokenizer": "estimate" if isinstance(self.tokens, TokenEstimate) else "model"}

    def start_batching(self, max_batch: int) -> None:
        """Nothing to start: the server batches concurrent requests its own way."""

    def stop_batching(self) -> None:
        """Nothing to stop (``start_batching``)."""

    def batch_status(self) -> BatchStatus | None:
        return None  # the batch is the server's: its own metrics tell of it

    def stream_group(self, prompts: Sequence[Prompt], params: GenerationParams,
                     references: Sequence[str]) -> Iterator[tuple[int, TextChunk]]:
        """Refused: ``answers_groups`` is False, so the pipeline sends each request alone."""
        raise ValueError("a remote engine answers each request on its own: it has no PiD batch to share a document's prompt")

    def template(self, messages: Sequence[Message]) -> list[int]:
        return self.tokens.prompt_ids(messages)

    def count_tokens(self, text: str) -> int:
        return self.tokens.count_tokens(text)

    def stream(self, prompt: Prompt, params: GenerationParams, references: Sequence[str] = ()) -> Iterator[TextChunk]:
        """Post ``prompt.messages``; yield the answer's text as it arrives, then a last chunk
        with the finish reason and the stats. ``references`` stay here: the server copies
        from the prompt itself if it speculates (see the README), unless
        ``settings.send_references`` sends them for a remote `ragdec serve` to copy from.

        Raises:
            EngineError: unreachable, an error status, silent past the read timeout, over
                the total timeout, or cut off mid-answer.
        """
        import httpx

        settings = self.settings
        body = {"model": self.name, "messages": list(prompt.messages), "max_tokens": params.max_new_tokens,
                "temperature": 0, "stream": settings.stream}
        if settings.stream:
            body["stream_options"] = {"include_usage": True}
        if params.stop:
            body["stop"] = list(params.stop)
        if settings.send_references and references:
            body["ragdec"] = {"references": list(references)}
        deadline = time.monotonic() + settings.timeout_s
        response, sent_at = self._send(body, deadline)
        reply = _Reply(sent_at)
        try:
            if settings.stream:
                for event in sse_events(_until(response.iter_lines(), deadline)):
                    if event is None:
                        reply.done = True
                        break
                    if text := reply.take(event, self.url):
                        yield TextChunk(text, ())
            else:
                event = json.loads(response.read())
                reply.done = True
                if text := reply.take(event, self.url):
                    yield TextChunk(text, ())
        except httpx.TimeoutException:
            state = "stopped answering" if reply.texts else "did not start answering"
            raise EngineError(
                f"the remote engine at {self.url} {state}: nothing came for {settings.read_timeout_s:g} s "
                "(--remote-read-timeout): check the server's load, or raise the timeout for long prompts on a slow server"
            ) from None
        except (httpx.TransportError, httpx.StreamError) as error:
            raise EngineError(
                f"the connection to the remote engine at {self.url} dropped mid-answer after {len(''.join(reply.texts))} "
                f"characters ({type(error).__name__}: {error}): the answer is cut; check the server's log, and ask again"
            ) from None
        except TimeoutError:  # _until: past the deadline
            raise EngineError(
                f"the remote engine at {self.url} did not finish the answer within {settings.timeout_s:g} s: "
                "ask for fewer tokens, or raise --remote-timeout"
            ) from None
        # a body or an event that is not JSON, or JSON not shaped as a chat completion ({"choices": "x"})
        except (ValueError, TypeError, AttributeError) as error:
            raise EngineError(f"the remote engine at {self.url} sent what is not an OpenAI chat completion ({error}): "
                              "check that --base-url names an OpenAI-compatible API (ending in /v1)") from None
        finally:
            response.close()  # a consumer that stops early closes the connection: the server stops decoding
        # a stream's [DONE] without a finish reason is a cut too: llama-cpp-python's server ends an
        # answer so when another request comes (unless it runs with --interrupt_requests False)
        if reply.finish_reason is None and (settings.stream or not reply.done):
            got = len("".join(reply.texts))
            raise EngineError(
                f"the remote engine at {self.url} ended the stream {f'mid-answer after {got} characters' if got else 'before any text'} "
                "without a finish reason: the answer is cut; check the server's log, and ask again (llama-cpp-python's "
                "server does this to a prompt over its context: see --remote-context)"
            )
        yield TextChunk("", (), reply.finish_reason or "stop", reply.stats(prompt, self.tokens.count_tokens))

    # ---- one request, retried -----------------------------------------------------------------

    def _send(self, body: dict, deadline: float) -> tuple[httpx.Response, float]:
        """Open the response (its body not read yet) and the time its request was sent,
        after as many tries as connection errors, 429 and 503 call for.

        Raises:
            EngineError: unreachable after the retries, an error status, or no time left.
        """
        import httpx

        # the connection failed before the server answered: nothing was decoded, asking again is safe
        retried_errors = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
        settings = self.settings
        for attempt in range(settings.retries + 1):
            left = deadline - time.monotonic()
            timeout = httpx.Timeout(min(settings.read_timeout_s, left), connect=min(settings.connect_timeout_s, left))
            sent_at = time.perf_counter()
            try:
                response = self.client.send(self.client.build_request("POST", self.url, json=body, timeout=timeout), stream=True)
            except retried_errors as error:
                failure = f"{type(error).__name__}: {error}"
                wait = self._wait(attempt, None, deadline)
                if wait is None:
                    raise EngineError(
                        f"cannot reach the remote engine at {self.url} ({failure}; {attempt + 1} tries): check that the "
                        "server is running and listening there, and that --base-url names it (scheme, host, port, and the "
                        "API root such as /v1)"
                    ) from None
                log.info("remote engine at %s: %s; trying again in %.1f s", self.url, failure, wait)
                time.sleep(wait)
                continue
            except httpx.TimeoutException:
                raise EngineError(
                    f"the remote engine at {self.url} did not start answering: nothing came for "
                    f"{min(settings.read_timeout_s, left):g} s (--remote-read-timeout): check the server's load, or "
                    "raise the timeout for long prompts on a slow server"
                ) from None
            if response.status_code == 200:
                return response, sent_at
            message = _server_message(response)
            if response.status_code in RETRIED_STATUSES:
                wait = self._wait(attempt, _retry_after(response), deadline)
                if wait is not None:
                    log.info("remote engine at %s: %s; trying again in %.1f s", self.url, response.status_code, wait)
                    time.sleep(wait)
                    continue
            raise EngineError(self._status_error(response, message, attempt + 1))
        raise AssertionError("unreachable: the last try returns or raises")

    def _wait(self, attempt: int, retry_after: float | None, deadline: float) -> float | None:
        """Seconds to wait before the next try, or None when there is no next try (the
        retries are spent, or the wait would pass the deadline).

        Example: backoff 0.5 s, tries 1, 2, 3 -> waits 0.5, 1, 2 s; a Retry-After of 120
        with max_wait_s 30 -> 30.
        """
        settings = self.settings
        if attempt >= settings.retries:
            return None
        wait = min(settings.max_wait_s, retry_after if retry_after is not None else settings.backoff_s * 2**attempt)
        return wait if time.monotonic() + wait < deadline else None

    def _status_error(self, response: httpx.Response, message: str, tries: int) -> str:
        """The sentence for an error status: what the server said, and what to check."""
        status = response.status_code
        said = f"the remote engine at {self.url} answered {status} {response.reason_phrase}: {message}"
        if status in (401, 403):
            return f"{said}; check --remote-api-key (or $RAGDEC_REMOTE_API_KEY)"
        if status == 404:
            return (f"{said}; check --base-url (the API root, such as http://HOST:PORT/v1) and --remote-model "
                    f"{self.name!r} (GET {self.base_url}/models lists the server's models)")
        if status in RETRIED_STATUSES:
            return f"{said}; still busy after {tries} tries: ask again later, or give it more with --remote-retries"
        if status >= 500:
            return f"{said}; the server's log has the details"
        return said


class _Reply:
    """What the server's reply to one request (streamed, or whole) has brought so far:
    the parser's state, not a record (what crosses the seam is ``TextChunk``)."""

    def __init__(self, sent_at: float):
        self.sent_at = sent_at
        self.first_at: float | None = None
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict = {}
        self.server_stats: dict = {}  # forward_passes, drafted_tokens, accepted_tokens where the server tells them
        self.done = False

    def take(self, event: dict, url: str) -> str:
        """The text an event (a chunk, or a whole completion) adds; its finish reason,
        usage and draft figures noted.

        Raises:
            EngineError: the event is the server's error, or ends the answer with one.
        """
        if not isinstance(event, dict):
            raise ValueError(f"an event of type {type(event).__name__}")
        if event.get("error"):
            raise EngineError(f"the remote engine at {url} failed mid-answer: {_message_of(event)}")
        text = delta_text(event) or "".join((c.get("message") or {}).get("content") or "" for c in event.get("choices", []))
        if text:
            self.first_at = self.first_at or time.perf_counter()
            self.texts.append(text)
        for choice in event.get("choices", []):
            reason = choice.get("finish_reason")
            if reason in ("error", "abort"):
                raise EngineError(f"the remote engine at {url} ended the answer with finish_reason {reason!r}: check its log")
            if reason:
                self.finish_reason = "length" if reason == "length" else "stop"
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        timings = event.get("timings")  # llama-server
        if isinstance(timings, dict) and "draft_n" in timings:
            self.server_stats.update(drafted_tokens=timings["draft_n"], accepted_tokens=timings.get("draft_n_accepted", 0))
        ragdec_stats = (event.get("ragdec") or {}).get("stats") if isinstance(event.get("ragdec"), dict) else None
        if isinstance(ragdec_stats, dict):  # another ragdec serve
            self.server_stats.update({k: ragdec_stats[k] for k in ("forward_passes", "drafted_tokens", "accepted_tokens") if k in ragdec_stats})
        return text

    def stats(self, prompt: Prompt, count_tokens) -> DecodeStats:
        """Times measured here; token counts the server's (else counted here: the named
        model's tokenizer, or the estimate); forwards and drafts where the server tells them."""
        ended = time.perf_counter()
        usage = self.usage
        details = usage.get("prompt_tokens_details") or {}
        figures = {k: int(v) for k, v in self.server_stats.items() if isinstance(v, (int, float))}
        return DecodeStats(
            forward_passes=figures.get("forward_passes", 0),  # 0: not known
            new_tokens=int(usage.get("completion_tokens") or count_tokens("".join(self.texts))),
            drafted_tokens=figures.get("drafted_tokens", 0),
            accepted_tokens=figures.get("accepted_tokens", 0),
            seconds=ended - self.sent_at,
            prefill_seconds=(self.first_at or ended) - self.sent_at,
            prompt_tokens=int(usage.get("prompt_tokens") or len(prompt.token_ids)),
            reused_prompt_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
        )


# ---- the server's words -----------------------------------------------------------------------


def sse_events(lines: Iterable[str | bytes]) -> Iterator[dict | None]:
    """The parsed ``data:`` events of a server-sent stream; None for its closing [DONE].

    Example: lines ``['data: {"a": 1}', '', ': keep-alive', 'data: [DONE]']`` -> ``{"a": 1}``, None.
    """
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        yield json.loads(payload)


def _until(lines: Iterable[str], deadline: float) -> Iterator[str]:
    """``lines`` until ``time.monotonic()`` passes ``deadline``, then TimeoutError: checked at
    every line, since a server's keep-alive comments (llama-cpp-python's server pings while
    a request waits for its lock) reset the read timeout but bring no event."""
    for line in lines:
        if time.monotonic() > deadline:
            raise TimeoutError
        yield line


def delta_text(event: dict) -> str:
    """The content an event of a streamed chat completion adds."""
    return "".join((choice.get("delta") or {}).get("content") or "" for choice in event.get("choices", []))


def _message_of(body) -> str:
    """The error message in a server's body: OpenAI's and llama-server's ``{"error":
    {"message"}}``, older vLLM's ``{"message"}``, FastAPI's ``{"detail"}``, or a bare string."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("error", "message", "detail"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


def _server_message(response: httpx.Response) -> str:
    """The message of an error response (its body read and closed)."""
    import httpx

    try:
        raw = response.read()
    except httpx.HTTPError as error:
        return f"(the body could not be read: {error})"
    finally:
        response.close()
    try:
        return _message_of(json.loads(raw))
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:500] or "(no message)"


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (a number of seconds, or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):  # neither: ignored, the backoff applies
        return None
