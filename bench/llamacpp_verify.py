"""`ragdec bench llamacpp-verify`: could ragdec's draft-and-verify loop run on llama.cpp?

Two facts decide it, both measured here on the zoo's GGUF through llama-cpp-python's
low-level batch API (``llama_decode`` with per-position logits, ``llama_memory_seq_rm``
to crop), on the chat-templated ids of the first rag prompts:

1. **What a verify costs**: one forward over the last token plus k draft tokens, for k
   from 0 to 16, after the prompt (each width's fastest of ``repeats`` runs), beside the
   same curve of ragdec's own engine (``cost.measure_forward_cost``: float32, bfloat16, int4).
   LLMA pays only where a draft of k costs little more than one token.
2. **Whether a verify is lossless**: the logits of each row of a k-token batch against
   the logits of the same tokens fed one at a time (the greedy loop). A lossless method
   must get the same argmax at every row; bitwise-equal logits guarantee it.

Each llama.cpp setting that could change either (the repacked CPU kernels, flash
attention, a float32 KV cache) is measured in turn.
"""

from __future__ import annotations

import time
from typing import Sequence

from .llamacpp import import_llama_cpp

WIDTHS = (0, 1, 2, 3, 4, 6, 8, 12, 16)  # draft tokens on top of the last token
SETTINGS = (
    {"repack": True, "flash_attn": "auto", "kv": "f16"},  # llama.cpp's defaults
    {"repack": False, "flash_attn": "off", "kv": "f16"},
    {"repack": False, "flash_attn": "on", "kv": "f16"},
    {"repack": True, "flash_attn": "off", "kv": "f16"},
    {"repack": False, "flash_attn": "off", "kv": "f32"},
)
FLASH = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
GGML_TYPE_F32 = 0


class LowLevelLlama:
    """One llama.cpp model and context driven token by token: ``decode(tokens, pos)`` returns
    the logits of every position; ``crop(pos)`` forgets the cache from ``pos`` on."""

    def __init__(self, gguf: str, threads: int, repack: bool, flash_attn: str, kv: str, n_ctx: int = 4096):
        self.L = L = import_llama_cpp()
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        ctx = L.llama_context_default_params()
        ctx.n_ctx, ctx.n_batch, ctx.n_ubatch = n_ctx, 512, 512
        ctx.n_threads = ctx.n_threads_batch = threads
        ctx.flash_attn_type = FLASH[flash_attn]
        if kv == "f32":
            ctx.type_k = ctx.type_v = GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, 1)

    def decode(self, tokens: Sequence[int], pos: int, all_logits: bool = True):
        import numpy as np

        L, batch = self.L, self.batch
        out = []
        for start in range(0, len(tokens), 512):
            part = tokens[start : start + 512]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or start + i == len(tokens) - 1
            code = L.llama_decode(self.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            rows = range(len(part)) if all_logits else ([len(part) - 1] if start + len(part) == len(tokens) else [])
            out += [np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).copy() for i in rows]
        return out

    def crop(self, pos: int) -> None:
        self.L.llama_memory_seq_rm(self.memory, 0, pos, -1)

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def cost_curve(llama: LowLevelLlama, prompt: Sequence[int], repeats: int) -> list[float]:
    """Seconds of a forward over 1 + k tokens after ``prompt``, per k in WIDTHS (fastest run)."""
    llama.crop(0)
    llama.decode(prompt, 0, all_logits=False)
    out = []
    for k in WIDTHS:
        tokens = list(prompt[-(k + 1) :])  # real tokens, re-read at new positions
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            llama.decode(tokens, len(prompt))
            best = min(best, time.perf_counter() - start)
            llama.crop(len(prompt))
        out.append(round(best, 5))
    return out


def invariance(llama: LowLevelLlama, prompt: Sequence[int], width: int) -> dict:
    """The last ``width`` prompt tokens verified in one batch against one at a time."""
    import numpy as np

    head, tail = list(prompt[:-width]), list(prompt[-width:])
    llama.crop(0)
    llama.decode(head, 0, all_logits=False)
    batched = llama.decode(tail, len(head))
    llama.crop(len(head))
    single = [llama.decode([token], len(head) + i)[0] for i, token in enumerate(tail)]
    llama.crop(0)
    return {
        "rows": width,
        "bitwise_equal_rows": sum(bool(np.array_equal(a, b)) for a, b in zip(batched, single)),
        "same_argmax_rows": sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(batched, single)),
        "max_abs_diff": round(max(float(np.abs(a - b).max()) for a, b in zip(batched, single)), 5),
    }


def _costs(curve: Sequence[float]) -> str:
    return f"1 token {curve[0] * 1e3:.1f} ms, 1+4 {curve[WIDTHS.index(4)] * 1e3:.1f} ms, 1+8 {curve[WIDTHS.index(8)] * 1e3:.1f} ms"


def run_llamacpp_verify_bench(json_path: str | None, model: str | None = None, data: str | None = None,
                              prompts: int = 3, repeats: int = 5, width: int = 8) -> dict:
    from ragdec.app.cli_common import write_json
    from ragdec.decoding.cost import measure_forward_cost
    from ragdec.decoding.generator import Generator, configure_threads
    from ragdec.models.zoo import gguf_file

    from .machine import machine_info
    from .workloads import load_workload

    model = model or "qwen2.5-coder-0.5b-instruct"
    threads = configure_threads()
    generator = Generator.load(model)
    ids = [generator.prompt_ids(list(p.messages)) for p in load_workload("rag", data, prompts)]
    gguf = str(gguf_file(model))
    result = {"machine": machine_info(), "model": model, "gguf": gguf.rsplit("/", 1)[-1], "widths": list(WIDTHS),
              "settings": {"prompts": len(ids), "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1),
                           "repeats": repeats, "invariance_width": width, "threads": threads},
              "llamacpp": [], "ragdec": {}}
    for setting in SETTINGS:
        llama = LowLevelLlama(gguf, threads, **setting)
        try:
            curve = cost_curve(llama, ids[0], repeats)
            checks = [invariance(llama, p, width) for p in ids]
        finally:
            llama.close()
        result["llamacpp"].append({
            **setting, "seconds": curve, "relative_to_one_token": [round(s / curve[0], 3) for s in curve],
            "bitwise_equal_rows": sum(c["bitwise_equal_rows"] for c in checks),
            "same_argmax_rows": sum(c["same_argmax_rows"] for c in checks),
            "rows": sum(c["rows"] for c in checks), "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        })
        row = result["llamacpp"][-1]
        print(f"llama.cpp {setting}: {_costs(curve)}; batch rows equal to one-at-a-time {row['bitwise_equal_rows']}/{row['rows']}")
    for dtype in ("float32", "bfloat16", "int4"):
        engine = generator if dtype == "float32" else Generator.load(model, dtype)
        cost = measure_forward_cost(engine.model, context_len=len(ids[0]))
        curve = [round(cost.seconds[k], 5) for k in WIDTHS]
        result["ragdec"][dtype] = {"seconds": curve, "relative_to_one_token": [round(s / curve[0], 3) for s in curve]}
        print(f"ragdec {dtype}: {_costs(curve)}")
    if json_path:
        write_json(result, json_path)
    return result
