"""The command line: its parser and wiring (no weights), and end to end on
smollm2-135m-instruct."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ragdec.app.cli import build_parser, main
from ragdec.app.cli_common import DEFAULT_DTYPE, DEFAULT_MODEL, generation_params
from ragdec.decoding.methods import METHOD_OPTIONS, knob, method_options, registered_options

APP = Path(__file__).resolve().parents[1] / "ragdec" / "app"
# the command modules: each registers its commands; none may import another
COMMAND_MODULES = sorted(p.stem for p in APP.glob("cli*.py") if p.stem not in ("cli", "cli_common"))
OLD_KNOB_FLAGS = ("--trigger-n", "--copy-k", "--draft-model", "--fallback-threshold", "--rollback-threshold", "--exit-layer", "--exit-threshold")


def help_text(argv, capsys, monkeypatch) -> str:
    """``ragdec ARGV --help``, one line per flag (a wide terminal: no wrapping)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def flag_line(help: str, flag: str) -> str:
    """The flag's entry in ``help``: its line, and the next where argparse put the help of
    a long flag."""
    lines = help.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"\s+{re.escape(flag)}(\s|,|$)", line))
    follows = at + 1 < len(lines) and re.match(r"\s{8,}\S", lines[at + 1])
    return " ".join(line.strip() for line in lines[at : at + 2 if follows else at + 1])


# ---- flags made from the methods' option dataclasses ---------------------------------------


def test_every_registered_knob_is_a_flag_with_its_help(capsys, monkeypatch):
    help = help_text(["generate"], capsys, monkeypatch)
    knobs = 0
    for options in registered_options().values():
        for field in dataclasses.fields(options.config_class):
            if field.metadata.get("flag", True):
                line = flag_line(help, "--" + field.name.replace("_", "-"))
                assert f"{options.method}: {field.metadata['help']}" in line
                knobs += 1
    assert knobs >= 7
    assert "(default 0.3; bild-lossless 0.6)" in flag_line(help, "--fallback-threshold")
    for argv in (["generate"], ["bench", "rag"], ["ask"], ["chat"], ["serve"]):
        help = help if argv == ["generate"] else help_text(argv, capsys, monkeypatch)
        assert all(flag_line(help, flag) for flag in OLD_KNOB_FLAGS), argv


@dataclass(frozen=True)
class ToyConfig:
    toy_depth: int = knob(3, "how deep the toy goes")
    toy_share: float | None = knob(None, "share of 100% the toy keeps (default: all)")
    toy_cache: object = knob(None, "internal", flag=False)


def test_a_new_option_dataclass_brings_its_flags(capsys, monkeypatch):
    """Registering a method family's knobs is all it takes: a freshly built parser has
    their flags, typed and explained, and passes what is given to GenerationParams."""
    method_options("toy", {"toy_depth": 5})(ToyConfig)
    try:
        help = help_text(["generate"], capsys, monkeypatch)
        args = build_parser().parse_args(["generate", "--prompt", "hi", "--toy-depth", "4", "--toy-share", "auto"])
        options = generation_params(args).options
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "--prompt", "hi", "--toy-depth", "deep"])
        assert "invalid int value: 'deep'" in capsys.readouterr().err
    finally:
        METHOD_OPTIONS.pop("toy")
    assert re.search(r"--toy-depth N\s+toy: how deep the toy goes \(default 3; toy-lossless 5\)", help)
    assert "toy: share of 100% the toy keeps (default: all)" in flag_line(help, "--toy-share")
    assert "--toy-cache" not in help
    assert options == {"toy_depth": 4}  # auto, where None is the default, is the same as not given
    assert "--toy-depth" not in help_text(["generate"], capsys, monkeypatch)


def test_knob_values_are_typed_by_their_annotation():
    args = build_parser().parse_args([
        "generate", "--prompt", "hi", "--trigger-n", "2", "--copy-k", "auto", "--variants", "no", "--fallback-threshold", "0.5",
        "--draft-model", "smollm2-135m-instruct", "--exit-layer", "12",
    ])
    assert generation_params(args).options == {
        "trigger_n": 2, "variants": False, "fallback_threshold": 0.5, "draft_model": "smollm2-135m-instruct", "exit_layer": 12,
    }
    assert generation_params(build_parser().parse_args(["generate", "--prompt", "hi"])).options == {}


# ---- a flag left out is None; an explicit value is the user's ------------------------------


def test_generate_params_take_the_explicit_value_and_otherwise_generation_params_defaults():
    from ragdec.decoding.methods import GenerationParams

    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert args.max_new_tokens is None and args.method is None
    assert generation_params(args) == GenerationParams()
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--max-new-tokens", "128", "--method", "llma"])
    assert generation_params(args, stop=("\n",)) == GenerationParams(128, ("\n",), "llma")
    ask = build_parser().parse_args(["ask", "why?"])
    assert (ask.max_new_tokens, ask.method, ask.k, ask.mode) == (256, "auto", None, None)


def test_bench_passes_explicit_values_and_leaves_the_rest_to_the_workload(monkeypatch):
    from ragdec.bench import harness, pid, qa, server_load

    calls: dict[str, list] = {}

    def record(workload, returns=None):
        def run(*args, **kwargs):
            calls.setdefault(workload, []).append(args[-1] if workload == "rag" else kwargs)
            return returns

        return run

    monkeypatch.setattr(server_load, "run_server_load", record("server-load", {"ok": True}))
    monkeypatch.setattr(pid, "run_pid_bench", record("pid"))
    monkeypatch.setattr(qa, "run_qa_bench", record("qa"))
    monkeypatch.setattr(harness, "run_bench", record("rag", {}))
    monkeypatch.setattr(harness, "format_table", lambda result: "")
    for workload in ("server-load", "pid", "qa", "rag"):
        assert main(["bench", workload]) == 0
        # 128 was the bench's default once, and server-load then took its own 16 instead
        assert main(["bench", workload, "--max-new-tokens", "128", "--model", "qwen2.5-coder-0.5b-instruct"]) == 0
    default, explicit = calls["server-load"]
    assert default == {} and explicit == {"max_new_tokens": 128, "model": "qwen2.5-coder-0.5b-instruct"}
    default, explicit = calls["pid"]
    assert "max_new_tokens" not in default and "methods" not in default and explicit["max_new_tokens"] == 128
    default, explicit = calls["qa"]
    assert "max_new_tokens" not in default and default["methods"] is None and explicit["max_new_tokens"] == 128
    default, explicit = calls["rag"]
    assert default.max_new_tokens == harness.BenchConfig.max_new_tokens and default.warmup == harness.BenchConfig.warmup
    assert default.methods == ["hf-greedy", "greedy", "hf-prompt-lookup"] and default.options == {}
    assert explicit.max_new_tokens == 128
    assert main(["bench", "rag", "--methods", "greedy, llma:copy_k=4", "--warmup", "0", "--trigger-n", "2"]) == 0
    config = calls["rag"][-1]
    assert (config.methods, config.warmup, config.options) == (["greedy", "llma:copy_k=4"], 0, {"trigger_n": 2})


def test_help_states_the_defaults_of_the_layers_that_own_them(capsys, monkeypatch):
    """Where a flag stays None for a later layer to fill in, its help names that layer's
    default: the two must not drift apart."""
    from ragdec.bench.harness import BenchConfig
    from ragdec.bench.qa import CHAT_TURNS
    from ragdec.bench.server_load import CLIENTS, MAX_NEW_TOKENS, MODEL, REQUESTS_PER_CLIENT
    from ragdec.cache.calibration import calibrate_faq, calibrate_pairs
    from ragdec.cache.faq import FaqService
    from ragdec.pipelines.rag import RagSettings
    from ragdec.retrieval.readers import ReadOptions

    bench = help_text(["bench", "rag"], capsys, monkeypatch)
    assert f"{BenchConfig.max_new_tokens} for decoding" in flag_line(bench, "--max-new-tokens")
    assert f"{MAX_NEW_TOKENS} for server-load" in flag_line(bench, "--max-new-tokens")
    assert f"server-load without --load: {MODEL}" in flag_line(bench, "--model")
    for flag, default in (("--warmup", BenchConfig.warmup), ("--prompt-lookup-num-tokens", BenchConfig.prompt_lookup_num_tokens),
                          ("--max-matching-ngram-size", BenchConfig.max_matching_ngram_size), ("--turns", CHAT_TURNS),
                          ("--clients", CLIENTS), ("--requests-per-client", REQUESTS_PER_CLIENT)):
        assert f"(default {default})" in flag_line(bench, flag), flag
    ask = help_text(["ask"], capsys, monkeypatch)
    assert f"(default {RagSettings.k})" in flag_line(ask, "-k") and f"(default {RagSettings.search_mode})" in flag_line(ask, "--mode")
    assert f"(default {DEFAULT_DTYPE})" in flag_line(ask, "--dtype")  # the stack's, which build_stack applies
    assert "(default float32)" in flag_line(help_text(["generate"], capsys, monkeypatch), "--dtype")
    build = help_text(["index", "build"], capsys, monkeypatch)
    for name in ("text_field", "title_field", "id_field", "max_line_chars"):
        assert f"(default {getattr(ReadOptions, name)})" in flag_line(build, "--" + name.replace("_", "-")), name
    faq = help_text(["faq", "ask"], capsys, monkeypatch)
    service = inspect.signature(FaqService).parameters
    assert f"(default {DEFAULT_MODEL})" in flag_line(faq, "--model") and f"(default {DEFAULT_DTYPE})" in flag_line(faq, "--dtype")
    assert f"(default {service['max_new_tokens'].default})" in flag_line(faq, "--max-new-tokens")
    calibrate = help_text(["cache", "calibrate"], capsys, monkeypatch)
    pairs, faq_targets = inspect.signature(calibrate_pairs).parameters, inspect.signature(calibrate_faq).parameters
    assert f"(default {pairs['target_false_hit_rate'].default})" in flag_line(calibrate, "--target-false-hit-rate")
    assert pairs["target_false_hit_rate"].default == faq_targets["target_out_of_set_rate"].default  # one flag sets both
    assert f"(default {faq_targets['target_wrong_rate'].default})" in flag_line(calibrate, "--target-wrong-rate")


def test_json_writer_is_atomic_and_says_where(tmp_path, capsys):
    from ragdec.app.cli_common import write_json

    path = tmp_path / "out" / "report.json"
    write_json({"a": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert f"wrote {path}" in capsys.readouterr().err
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


# ---- the import graph of ragdec/app ---------------------------------------------------------


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for each import in ``path``; relative imports
    are made absolute (every file here is in ragdec.app)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = ["ragdec", "app"][: 3 - node.level] if node.level else []
            module = ".".join(package + ([node.module] if node.module else []))
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def test_no_app_module_imports_a_private_name_of_another_ragdec_module():
    """Neither ``from ragdec.x import _name`` nor ``import ragdec.x as m; m._name``."""
    bad = []
    for path in sorted(APP.glob("*.py")):
        modules = set()  # names bound to ragdec modules (or to what was imported from them)
        for module, name, line in imports(path):
            if not module.startswith("ragdec"):
                continue
            if name and name.startswith("_"):
                bad.append(f"{path.name}:{line} imports {name} from {module}")
            modules.add(name or module.split(".")[0])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    bad.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, bad


def test_command_modules_import_no_other_command_module():
    assert {"cli_bench", "cli_cache", "cli_free", "cli_generate", "cli_index", "cli_pipeline", "cli_serve"} <= set(COMMAND_MODULES)
    for stem in COMMAND_MODULES:
        for module, name, line in imports(APP / f"{stem}.py"):
            targets = {module.rsplit(".", 1)[-1]} | ({name} if module == "ragdec.app" else set())
            others = targets & ({"cli"} | set(COMMAND_MODULES) - {stem})
            assert not others, f"{stem}.py:{line} imports {others}"
    registered = {name for module, name, _ in imports(APP / "cli.py") if module == "ragdec.app"}
    assert registered == set(COMMAND_MODULES)  # the entry point registers every command module


# ---- end to end -----------------------------------------------------------------------------


def test_generate_writes_text_tokens_and_stats(tmp_path, capsys, weights):
    out = tmp_path / "out.json"
    reference = tmp_path / "ref.txt"
    reference.write_text("The capital of France is Paris. Paris lies on the Seine.")
    code = main([
        "generate", "--model", weights("smollm2-135m-instruct"), "--method", "llma", "--prompt", "What is the capital of France?",
        "--max-new-tokens", "12", "--reference-file", str(reference), "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"text", "token_ids", "stats"}
    assert set(result["stats"]) >= {"forward_passes", "new_tokens", "drafted_tokens", "accepted_tokens", "seconds"}
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) <= 12
    assert result["text"] and result["text"] in capsys.readouterr().out


def test_unknown_model_is_a_one_line_error(capsys):
    code = main(["generate", "--model", "no-such-model", "--prompt", "hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err and "Traceback" not in err


def test_models_list_shows_every_zoo_model(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct", "multilingual-e5-small", "all-minilm-l6-v2"):
        assert name in out


def test_bench_runs_methods_against_baselines(tmp_path, capsys, weights):
    rag = tmp_path / "rag"
    rag.mkdir()
    records = [
        {"query": "where is the eiffel tower", "docs": ["The Eiffel Tower is in Paris, France.", "It was built in 1889."], "davinci_answer": "The Eiffel Tower is in Paris, France."},
        {"query": "what do bees make", "docs": ["Bees make honey from nectar.", "Honey is stored in combs."], "davinci_answer": "Bees make honey from nectar."},
    ]
    (rag / "llma_msmarco.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bench.json"
    code = main([
        "bench", "rag", "--model", weights("smollm2-135m-instruct"), "--data", str(tmp_path), "--limit", "2",
        "--max-new-tokens", "10", "--methods", "hf-greedy,greedy,hf-prompt-lookup,llma:copy_k=4", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "transformers"}
    assert set(result["methods"]) == {"hf-greedy", "greedy", "hf-prompt-lookup", "llma:copy_k=4"}
    for entry in result["methods"].values():
        assert set(entry) >= {"tokens_per_s", "speedup_vs_hf_greedy", "identical_to_hf_greedy", "mean_tokens_per_forward", "mean_new_tokens", "ttft_s", "e2e_s"}
    # lossless methods give hf-greedy's tokens on these prompts
    assert result["methods"]["greedy"]["identical_to_hf_greedy"] == 1.0
    assert result["methods"]["llma:copy_k=4"]["identical_to_hf_greedy"] == 1.0
    assert "hf-prompt-lookup" in capsys.readouterr().out
