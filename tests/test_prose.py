"""No measured speed or time figures in ragdec's prose.

Docstrings, comments and command-line help say why the code is as it is; the
numbers that show it ("130 tokens/s", "2.6x greedy", "28 ms a step") go stale
in prose and live in the benchmark results under ``bench/results/``, which the
prose may name. This test reads every ``.py`` file under ``ragdec/``: comments
with ``tokenize``, docstrings (and other bare string statements) and the
literals passed as ``help=``, ``description=`` or ``epilog=`` (or as the help
of a method ``knob``) with ``ast``, and fails listing ``file:line`` and the
sentence for each figure it finds.

A figure is a number with a unit of time (``0.8 s``, ``28 ms``, ``3 minutes``),
of speed (``130 tokens/s``, ``12 answers per second``), or a ratio of speed
(``2.6x``, ``10 times faster``, ``30% faster``). Not figures: counts (``16
tokens``, ``2 cores``), shapes (``915 x 896``), names (``int4``, ``qwen0.5b``),
and settings, where the number is a limit or default rather than something measured: the
clause names it as such (``default 30 s``, ``timeout``, ``every 5 s``, ``after 10 s``,
``at most 600 s``), it is the value of a named setting (``lingering_time is 30 s``), or a
comment states the literal its code line sets (``# 1 MB in 30 s`` above ``TIMEOUT = 30``).
A paragraph that starts "Example" is a worked example, with numbers made up.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ragdec"

_NUMBER = r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_TIME_UNIT = (
    r"(?:ms|milliseconds?|µs|us|microseconds?|ns|nanoseconds?|secs?|seconds?"
    r"|mins?|minutes?|hours?|hrs?)\b"
)
_SPEED_UNIT = (
    r"(?:[a-z]+\s*/\s*s(?:ec)?\b|[a-z]+\s+(?:per|a|an)\s+(?:second|sec|minute|hour)\b"
    r"|qps\b|rps\b)"
)
# what follows a ratio of sizes, not of speeds: "4x what they were trained on"
_SIZE = r"\s+(?:what|as\s+(?:many|much|large|big)|the\s+(?:size|memory|bytes|rows|tokens|number))\b"
_FASTER = r"(?:faster|slower|quicker|as\s+fast|as\s+slow|speed-?up|the\s+(?:speed|time)|less\s+time|more\s+time)"

FIGURE = re.compile(
    "|".join(
        (
            # 28 ms, 3 minutes, 0.8 s (a bare "s" only after a space or a decimal: not "1990s")
            rf"{_NUMBER}\s*{_TIME_UNIT}",
            rf"(?<![\w.])\d+\.\d+\s*s\b",
            rf"{_NUMBER}\s+s\b(?![-=(])",
            # 130 tokens/s, 12 answers per second, 40 tok/s
            rf"{_NUMBER}\s*(?:new\s+)?{_SPEED_UNIT}",
            # 2.6x, 10x faster, 1.5 × (not 915 x 896, not 0x1f)
            rf"{_NUMBER}\s?[x×](?!\w|\.\w|\s*\d|{_SIZE})",
            # 10 times faster, 3 times as fast, 2 times the time
            rf"{_NUMBER}\s+times\s+{_FASTER}",
            # 30% faster, 40 percent less time; a 25% speedup; faster by 30%
            rf"{_NUMBER}\s*(?:%|percent)\s+{_FASTER}",
            rf"{_FASTER}\s+(?:of\s+|by\s+)?(?:about\s+|roughly\s+|some\s+)?{_NUMBER}\s*(?:%|percent)",
        )
    ),
    re.IGNORECASE,
)

# Words that make a number in the same clause a setting, not a measurement.
SETTING = re.compile(
    r"\b(?:defaults?|timeouts?|timed?\s+out|every|after|within|at\s+most|up\s+to|no\s+more\s+than"
    r"|limit(?:s|ed)?|caps?|capped|deadline|budget|interval|wait(?:s|ing)?|sleeps?|poll(?:s|ing)?"
    r"|retry|retries|backoff|ttl|expires?|max(?:imum)?|min(?:imum)?|allow(?:s|ed)?|target)\b",
    re.IGNORECASE,
)
# The value of a named setting, here or in another program: "nginx's lingering_time is 30 s",
# "--body-timeout 30 s".
NAMED_SETTING = re.compile(r"(?:\b[a-z]+_[a-z_]+\b|--[a-z][\w-]*)`*\s*(?:is|=|of)?\s*$")
_CLAUSE_END = re.compile(r"[.;:!?()\[\]]\s|[.;:!?]$|\n\s*\n|^\s*[-*]\s", re.MULTILINE)

# A paragraph that starts so is a worked example: its numbers are made up to show the sum.
EXAMPLE = re.compile(r"(?:for\s+)?(?:an?\s+)?(?:worked\s+)?examples?\b|e\.g\.|>>>", re.IGNORECASE)

HELP_KEYWORDS = {"help", "description", "epilog"}


def _number(figure: str) -> float:
    """The number a figure starts with: ``"1,030 ms"`` -> 1030.0."""
    return float(re.search(r"\d[\d,.]*\d|\d", figure).group(0).replace(",", ""))


def _paragraph_before(text: str, start: int) -> str:
    """The part of ``text``'s paragraph that comes before ``start``, unindented."""
    breaks = list(re.finditer(r"\n\s*\n", text[:start]))
    return text[breaks[-1].end() if breaks else 0 : start].lstrip()


def _clause_before(text: str, start: int) -> str:
    """The part of ``text``'s clause that comes before ``start``."""
    begin = 0
    for end in _CLAUSE_END.finditer(text, 0, start):
        begin = end.end()
    return text[begin:start]


def figures_in(text: str, settings: set[float] = frozenset()) -> list[tuple[int, str]]:
    """(offset, matched text) of every speed or time figure in ``text``; a number in
    ``settings`` (the literals of the code a comment sits on) is the code's own value.

    >>> [m for _, m in figures_in("llma decodes 49.5 tokens/s, 2.6x greedy; a step takes 28 ms")]
    ['49.5 tokens/s', '2.6x', '28 ms']
    >>> figures_in("int4 weights, k=4, 16 tokens on 2 cores, a 915 x 896 product, qwen0.5b")
    []
    >>> figures_in("the read timeout (default 30 s); polls every 50 ms")
    []
    """
    found = []
    for match in FIGURE.finditer(text):
        if SETTING.search(_clause_before(text, match.start())):
            continue
        if NAMED_SETTING.search(text, 0, match.start()):
            continue
        if EXAMPLE.match(_paragraph_before(text, match.start())):
            continue
        if _number(match.group(0)) in settings:
            continue
        # what follows from a setting ("1 MB in 30 s is 270 kbit/s") is arithmetic too
        before = _clause_before(text, match.start())
        if any(_number(m.group(0)) in settings for m in FIGURE.finditer(before)):
            continue
        found.append((match.start(), match.group(0)))
    return found


def _sentence(text: str, offset: int) -> str:
    """The line of ``text`` around ``offset``, for the failure message."""
    begin = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    return text[begin : end if end >= 0 else len(text)].strip()


def _string_value(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # an f-string: its literal parts
        return "".join(_string_value(part) or "{}" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left), _string_value(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _prose_strings(tree: ast.AST):
    """(line, text) of docstrings, bare string statements and help literals."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr):
            value = _string_value(node.value)
            if value is not None:
                yield node.value.lineno, value
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in HELP_KEYWORDS:
                    value = _string_value(keyword.value)
                    if value is not None:
                        yield keyword.value.lineno, value
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "knob" and len(node.args) >= 2:
                value = _string_value(node.args[1])
                if value is not None:
                    yield node.args[1].lineno, value


def _numbers(code: str) -> set[float]:
    """The numeric literals of a line of code."""
    found = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.NUMBER:
                try:
                    found.add(float(token.string.replace("_", "")))
                except ValueError:  # 0x1f, 1j
                    pass
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return found


def _comments(source: str):
    """(line, text, numbers) of every comment; a run of whole-line comments reads as one
    text. ``numbers`` are the literals of the code the comment belongs to (its own line,
    or the line after a run), so that a comment may state the value the code sets."""
    lines = source.splitlines()

    def code_after(line: int) -> str:
        for code in lines[line:]:
            if code.strip() and not code.lstrip().startswith("#"):
                return code
        return ""

    run: list[tuple[int, str]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line, text = token.start[0], token.string.lstrip("#").strip()
        trailing = bool(token.line[: token.start[1]].strip())
        if run and (trailing or line != run[-1][0] + 1):
            yield run[0][0], "\n".join(t for _, t in run), _numbers(code_after(run[-1][0]))
            run = []
        if trailing:
            yield line, text, _numbers(token.line[: token.start[1]])
        else:
            run.append((line, text))
    if run:
        yield run[0][0], "\n".join(t for _, t in run), _numbers(code_after(run[-1][0]))


def prose_figures(path: Path) -> list[str]:
    """``file:line: figures | line of prose`` for each line of ``path``'s prose with figures."""
    source = path.read_text(encoding="utf-8")
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    texts = list(_comments(source))
    texts += [(line, text, set()) for line, text in _prose_strings(ast.parse(source, str(path)))]
    by_line: dict[int, tuple[list[str], str]] = {}
    for first_line, text, code_numbers in texts:
        for offset, figure in figures_in(text, code_numbers):
            line = first_line + text.count("\n", 0, offset)
            figures, _ = by_line.setdefault(line, ([], _sentence(text, offset)))
            figures.append(" ".join(figure.split()))
    return [
        f"{where}:{line}: {', '.join(figures)} | {sentence}"
        for line, (figures, sentence) in sorted(by_line.items())
    ]


def test_no_measured_figures_in_ragdec_prose():
    offenders = [m for path in sorted(PACKAGE.rglob("*.py")) for m in prose_figures(path)]
    assert not offenders, (
        f"{len(offenders)} measured speed/time figure(s) in ragdec's docstrings, comments or"
        " help; keep the reason and name the bench/results/*.json file that holds the"
        " number instead:\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    "text",
    [
        "about 130 tokens/s on 2 cores",
        "decodes at 12.1 new tokens/s",
        "10x faster than greedy",
        "llma reaches 2.6x",
        "a verify costs 1.15x a step",
        "each step takes 0.8 s",
        "prefill takes 28 ms",
        "calibrating took 3 min",
        "the build takes about 10 minutes",
        "1.5 seconds to the first token",
        "it runs about 5 times as fast",
        "3 times faster than transformers",
        "a 30% speedup over greedy",
        "30% faster",
        "faster by 25%",
        "serves 40 answers per second",
        "1,030 ms for the prompt",
        "a 998-token prompt takes 1.61s",
        "takes 2.3 µs a call",
        "2.58× llama.cpp",
    ],
)
def test_figures_are_found(text, tmp_path):
    assert figures_in(text), text
    source = tmp_path / "module.py"
    source.write_text(f'"""{text}."""\n\n# {text}\nx = parser.add_argument("--x", help="{text}")\n')
    assert [line.split(":")[1] for line in prose_figures(source)] == ["1", "3", "4"]


@pytest.mark.parametrize(
    "text",
    [
        "transformers 4.46 and torch 2.5",
        "4-bit weights in groups of 32",
        "int4 and bfloat16",
        "k=4 drafts of 16 tokens",
        "a 915 x 896 x 4864 product",
        "0x1F",
        "2 cores, 8 rows",
        "qwen2.5-coder-0.5b and the 1.5B",
        "timeout in seconds",
        "the read timeout, 120 s, waits for the first byte",
        "(default 30 s)",
        "polls every 50 ms",
        "closes after 5 s",
        "at most 600 s, retries included",
        "bench/results/llamacpp_rag_int4.json holds the speedup",
        "tokens per forward",
        "its 1990s models",
        "see https://example.org/v1/s",
        "a 16 s-long clip",
        "the longest a connection is drained (nginx's lingering_time is 30 s)",
        "`--body-timeout` 30 s",
        "retrain once the index holds 4x what it was trained on",
        "Example: seconds(4 tokens) = 0.20: W = 0 gives 4 tokens in 0.20 s (20/s)",
    ],
)
def test_non_figures_pass(text):
    assert not figures_in(text), figures_in(text)


def test_a_comment_may_state_the_value_its_code_sets(tmp_path):
    """The number a constant is set to is a setting, with what follows from it; another
    number in the same comment is still a measurement."""
    source = tmp_path / "module.py"
    source.write_text(
        "# 1 MB in 30 s is 270 kbit/s, slower than any working link\n"
        "BODY_TIMEOUT = 30.0\n"
        "RETRAIN_GROWTH = 4  # retrain once grown 4x; a rebuild costs 2x a search\n"
        "# a step takes 28 ms, so 30 s is plenty\n"
        "TIMEOUT = 30\n"
    )
    assert prose_figures(source) == [
        f"{source}:3: 2x | retrain once grown 4x; a rebuild costs 2x a search",
        f"{source}:4: 28 ms | a step takes 28 ms, so 30 s is plenty",
    ]


def test_docstring_examples():
    import doctest
    import sys

    assert doctest.testmod(sys.modules[__name__]).failed == 0
