"""A causal LM and its tokenizer, ready to answer: prompts in, streamed text out."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .kv import PrefixStore
from .loop import Row, decode
from .methods import GenerationParams, method_factory
from .seam import DecodeStats
from .stopping import StopCondition
from .text import TextStream


def configure_threads() -> int:
    """Use every core this process may run on (torch's default can be lower)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (the platform's name elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class TextChunk:
    """Decoded text: a loop's ``Block`` with its text. A stream yields one chunk per block;
    a whole answer is the one chunk that joins them all (``TextChunk.join``)."""

    text: str  # new text since the previous chunk (the answer's, cut before any stop string)
    token_ids: tuple[int, ...]  # new token ids since the previous chunk (EOS, a stop string's tokens included)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    stats: DecodeStats | None = None  # on the last chunk

    @classmethod
    def join(cls, chunks: Iterable["TextChunk"]) -> "TextChunk":
        """The whole answer from one request's stream of chunks (the last carries the end).

        The one place a whole answer is assembled: ``Generator.generate`` and
        ``pid_generate`` come here.
        """
        texts: list[str] = []
        token_ids: list[int] = []
        last = None
        for last in chunks:
            texts.append(last.text)
            token_ids.extend(last.token_ids)
        if last is None or last.finish_reason is None:
            raise ValueError("the stream ended before its last chunk (no finish_reason)")
        return cls("".join(texts), tuple(token_ids), last.finish_reason, last.stats)


DTYPES = ("float32", "bfloat16", "int4")  # int4: 4-bit weights for decoding (int4.py), bfloat16 otherwise


def torch_dtype(name: str | None):
    """torch's dtype for a name in DTYPES (int4 loads in bfloat16 first); None stays None
    (the loader's float32)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return torch.bfloat16 if name == "int4" else getattr(torch, name)


class ChatTokenizer:
    """A model's tokenizer as prompts need it: chat messages to token ids, token counts,
    ids back to text. What a remote engine measures prompts with when it knows the model
    (a zoo name or a local folder: the tokenizer loads without the weights)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent calls

    @classmethod
    def load(cls, name_or_path: str) -> "ChatTokenizer":
        """The tokenizer of a zoo model (prepared first when needed), a local folder or a hub id."""
        from transformers import AutoTokenizer

        from ragdec.models.zoo import resolve

        return cls(AutoTokenizer.from_pretrained(resolve(name_or_path)))

    def prompt_ids(self, prompt: str | Sequence[dict], chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (one user message when ``chat``) or OpenAI-style
        messages, through the model's chat template when it has one."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if chat and self.tokenizer.chat_template:
            with self._tokenizer_lock:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        with self._tokenizer_lock:
            return self.tokenizer(text)["input_ids"]

    def decode_text(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class Generator(ChatTokenizer):
    """Answers prompts with one model, by any registered decoding method."""

    def __init__(self, model, tokenizer, name: str = ""):
        super().__init__(tokenizer)
        self.model = model
        self.name = name or getattr(model.config, "_name_or_path", "")
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        self.method_state: dict[str, object] = {}  # what a method learns across requests
        self.prefixes = PrefixStore()  # KV of recurring prompt prefixes (see ``stream``)
        # held around every forward: the batch scheduler's thread and a caller's own loop
        # (PiD) may share the model, whose attention setting PiD switches for its forwards
        self.model_lock = threading.RLock()
        self.scheduler = None  # a BatchScheduler once ``start_batching``: concurrent callers share its batch

    @classmethod
    def load(cls, name_or_path: str, dtype: str | None = None) -> "Generator":
        """Load a zoo model, a local folder or a hub id (see ``zoo.resolve``).

        Args:
            dtype: "float32" (the default), "bfloat16" or "int4". On CPUs with AMX
                (``lscpu`` flag amx_bf16) bfloat16 reads prompts an order of magnitude
                faster and verifies a draft of six tokens in about the time of one
                (bench/results/llamacpp_verify.json has each width's time); greedy output
                may differ from float32's, so compare methods at one dtype. A 16-bit
                model attends with ``attention.INVARIANT``; bfloat16's linear layers can
                still make a verified draft differ from greedy in the last bits (see
                attention.py). "int4" decodes on 4-bit weights with a row-invariant
                kernel and reads prompts in 8 bits (``int4.py``): lossless methods are
                identical to greedy in float32 and in int4.
        """
        import torch

        from ragdec.models.zoo import load_causal_lm

        from .attention import use_invariant_attention

        configure_threads()
        model, tokenizer = load_causal_lm(name_or_path, dtype=torch_dtype(dtype))
        if dtype == "int4":
            from .int4 import quantize_model

            quantize_model(model)
        elif model.dtype in (torch.bfloat16, torch.float16):
            use_invariant_attention(model)
        return cls(model, tokenizer, name=name_or_path)

    def start_batching(self, max_batch: int = 8, prefill_chunk: int | None = None):
        """From now on, ``stream`` calls from any thread join one batch that a thread of its
        own decodes (continuous batching; see ``scheduler.py``). ``prefill_chunk``: prompt
        tokens a joining request reads per step while others decode (None: the measured
        default, ``scheduler.DEFAULT_PREFILL_CHUNK``). Returns the scheduler."""
        from .scheduler import DEFAULT_PREFILL_CHUNK, BatchScheduler

        self.stop_batching()
        chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        self.scheduler = BatchScheduler(self.model, max_batch, chunk, self.model_lock)
        return self.scheduler

    def stop_batching(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams = GenerationParams(),
        references: Sequence[str] = (),
        prefix_len: int = 0,
    ) -> Iterator[TextChunk]:
        """Decode with ``params.method``, yielding text as tokens are accepted.

        ``prefix_len``: the first tokens of ``prompt_ids`` recur across requests (a fixed
        system prompt, a chat's history): their KV is kept in ``self.prefixes`` and reused,
        so only the rest of the prompt is prefilled.
        """
        text = TextStream(self.decode_text, params.stop)
        scheduler = self.scheduler
        if scheduler is not None and scheduler.alive:
            blocks = scheduler.submit(lambda: self.row(prompt_ids, params, references, prefix_len))
        else:
            blocks = decode(self.model, self.row(prompt_ids, params, references, prefix_len), lock=self.model_lock)
        for block in blocks:
            final = block.finish_reason is not None
            yield TextChunk(text.push(block.token_ids, final), block.token_ids, block.finish_reason, block.stats)

    def row(self, prompt_ids: Sequence[int], params: GenerationParams, references: Sequence[str] = (), prefix_len: int = 0) -> Row:
        """The decode loop's row for one request: the method's drafter and acceptance rule,
        the stop condition, and the kept prefixes to use."""
        drafter, acceptance = method_factory(params.method)(self, prompt_ids, references, params)
        stop = StopCondition(self.eos_token_ids, tuple(params.stop), params.max_new_tokens)
        return Row(
            tokens=list(prompt_ids), prompt_len=len(prompt_ids), drafter=drafter, acceptance=acceptance, stop=stop,
            detokenize=self.decode_text, prefixes=self.prefixes if prefix_len > 0 else None, prefix_len=prefix_len,
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams = GenerationParams(),
        references: Sequence[str] = (),
        prefix_len: int = 0,
    ) -> TextChunk:
        """Decode to the end; return the whole answer (one chunk) with its stats."""
        return TextChunk.join(self.stream(prompt_ids, params, references, prefix_len))
