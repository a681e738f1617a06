"""Guards against near-duplicates that differ in meaning.

Embeddings place "What is the function of money?" and "What is the function of a TV?" close
together (the frame is the same, one noun differs), and a semantic cache that serves on
similarity alone answers one with the other. A guard reads the words themselves and says no
when something that decides the answer differs. Two guards, for two kinds of cache:

- ``paraphrase_guard`` (answers cached from earlier questions): the two questions must have
  the same numbers, the same content words and those words in the same order. Strict on
  purpose: on Quora's hard non-duplicates most false hits differ by one noun, one number, a
  question word, a tense or a negation, and a near hit (cached answers as references) costs
  little when the guard says no.
- ``specifics_guard`` (a curated FAQ, where paraphrases reword freely): every number and
  every name in the question must appear in the matched FAQ entry, so that "How do I
  delete my Instagram account?" is not served the Facebook answer.

Both return a ``Verdict`` whose ``reason`` says what differed, for logs and for users.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Words that do not change what is asked: articles, pronouns, auxiliaries of the present
# tense, most prepositions, fillers. Everything else is a content word, including what
# decides an answer although it is short: question words, negations, tense (was, did,
# will), modality (should, would), direction (to, from, before, after), quantity (more,
# most, too, only, all), reflexives ("at war with yourself" is not "at war").
STOPWORDS = frozenset(
    """
    a an the and or but if of in on at by for with about as so than then
    is are am be been being do does have has having can could
    i me my mine you your yours we us our ours he him his she her hers it its they them their theirs
    one someone somebody anyone anybody people person
    that this these those there here
    any some each very really actually basically exactly just also ever even
    get gets got getting thing things please
    """.split()
)

# numbers "1,000" "3.5"; words with their apostrophes and trailing + or # ("C++", "F#",
# "don't"); symbols that are content in programming questions ("~", "%", "=")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)*[+#]*|[~%$=<>*^@|\\€£¥₹]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_ACRONYM_DOTS = re.compile(r"\b(?:[^\W\d_]\.){2,}")  # "U.S." -> "US"
_SENTENCE_END = ".?!:;\n"
_FIRST_PERSON = frozenset({"i", "i'm", "i'd", "i've", "i'll"})


@dataclass(frozen=True)
class Verdict:
    passed: bool  # True: nothing that decides the answer differs
    reason: str  # what differed ("numbers differ: 500 vs 2000"), or "" when passed

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class Token:
    text: str  # as written, after Unicode normalization
    sentence_start: bool  # first word of a sentence: its capital says nothing


def tokenize(text: str) -> list[Token]:
    """Words, numbers and symbols, with whether each starts a sentence.

    Example: ``tokenize("Is U.S. GDP > 5%? I doubt it")`` -> Is(start) US GDP > 5 % I(start)
    doubt it.
    """
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    text = _ACRONYM_DOTS.sub(lambda m: m.group(0).replace(".", ""), text)
    tokens = []
    for match in _TOKEN.finditer(text):
        before = text[: match.start()].rstrip()
        tokens.append(Token(match.group(0), not before or before[-1] in _SENTENCE_END))
    return tokens


def numbers(text: str) -> list[str]:
    """The numbers in ``text``, sorted, thousands separators dropped.

    Example: ``numbers("Rs 500 and 1,000 notes")`` -> ``["1000", "500"]``.
    """
    return sorted(n.replace(",", "") for n in _NUMBER.findall(unicodedata.normalize("NFKC", text)))


def is_name(token: Token) -> bool:
    """A proper name or acronym: capitalized inside a sentence ("Facebook", "The Wire"), or
    two or more capitals anywhere ("FB", "IT"). "I" and its contractions are not names."""
    word = token.text
    if not word[0].isalpha() or word.lower() in _FIRST_PERSON:
        return False
    if len(word) >= 2 and word.isupper():
        return True
    return word[0].isupper() and not token.sentence_start


def stem(word: str) -> str:
    """Lower case, possessive and plural removed, negative contractions made "not"; nothing
    more, so that "engineer" and "engineering" stay apart.

    Examples: "Countries" -> "country", "boxes" -> "box", "Quora's" -> "quora",
    "don't" -> "not", "glass" -> "glass".
    """
    word = word.lower()
    if word.endswith("n't") or word == "cannot":
        return "not"
    if word.endswith("'s"):
        word = word[:-2]
    word = word.split("'")[0] if word.startswith(("i'", "you'", "we'", "they'", "he'", "she'", "it'", "what'")) else word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and len(word) > 4 and word[-3] in "sxz":
        return word[:-2]
    if word.endswith("s") and len(word) > 3 and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_words(text: str) -> list[str]:
    """Stemmed content words in order of first appearance; numbers are compared apart.

    Example: ``content_words("Why don't Poles like Russians?")`` ->
    ``["why", "not", "pole", "like", "russian"]``. A stopword written as a name counts:
    ``content_words("What is The Wire?")`` -> ``["what", "the", "wire"]``.
    """
    words: list[str] = []
    for token in tokenize(text):
        if _NUMBER.fullmatch(token.text):
            continue
        word = stem(token.text)
        if (token.text.lower() in STOPWORDS or word in STOPWORDS) and not is_name(token):
            continue
        if word not in words:
            words.append(word)
    return words


def names(text: str) -> list[str]:
    """Names and acronyms in ``text``, lower case, in order.

    Example: ``names("How do I delete my FB account on Facebook? Is it gone then?")`` ->
    ``["fb", "facebook"]`` ("How" and "Is" start sentences).
    """
    found: list[str] = []
    for token in tokenize(text):
        if is_name(token) and token.text.lower() not in found:
            found.append(token.text.lower())
    return found


def paraphrase_guard(question: str, cached: str) -> Verdict:
    """Pass only when the questions ask the same thing in different function words.

    Three checks, in order: the numbers are the same; the content words are the same set;
    they come in the same order.

    Examples::

        paraphrase_guard("What is the function of money?", "What is the function of a TV?")
        # Verdict(False, "words differ: money vs tv")
        paraphrase_guard("How do I lose 5 kg in a week?", "How do I lose 10 kg in a week?")
        # Verdict(False, "numbers differ: 5 vs 10")
        paraphrase_guard("Why do Poles dislike Russians?", "Why do Russians dislike Poles?")
        # Verdict(False, "word order differs: why dislike pole russian vs why dislike russian pole")
        paraphrase_guard("Who was the president?", "Who is the president?")
        # Verdict(False, "words differ: was vs (none)")
        paraphrase_guard("How do I get rid of a double chin?", "How can you get rid of double chins")
        # Verdict(True, "")
    """
    numbers_new, numbers_cached = numbers(question), numbers(cached)
    if numbers_new != numbers_cached:
        return Verdict(False, f"numbers differ: {_listing(numbers_new)} vs {_listing(numbers_cached)}")
    words_new, words_cached = content_words(question), content_words(cached)
    only_new = [w for w in words_new if w not in words_cached]
    only_cached = [w for w in words_cached if w not in words_new]
    if only_new or only_cached:
        return Verdict(False, f"words differ: {_listing(only_new)} vs {_listing(only_cached)}")
    if words_new != words_cached:
        return Verdict(False, f"word order differs: {' '.join(words_new)} vs {' '.join(words_cached)}")
    return Verdict(True, "")


def specifics_guard(question: str, matched: str) -> Verdict:
    """Pass when every number and every name of ``question`` appears in ``matched`` (the
    FAQ entry's question and answer), whatever else the wording does.

    Examples::

        faq = "How do I delete my Facebook account? Go to Settings, then ..."
        specifics_guard("Removing my facebook account.", faq)       # Verdict(True, "")
        specifics_guard("How do I delete my Instagram account?", faq)
        # Verdict(False, "not in the match: instagram")
        specifics_guard("Can I delete it within 14 days?", faq)     # Verdict(False, "not in the match: 14")
    """
    haystack = unicodedata.normalize("NFKC", matched).lower()
    words = set(re.findall(r"[^\W_]+(?:[+#]+)?", _ACRONYM_DOTS.sub(lambda m: m.group(0).replace(".", ""), haystack)))
    missing = [n for n in numbers(question) if n not in set(numbers(matched))]
    missing += [name for name in names(question) if name not in words and stem(name) not in words]
    if missing:
        return Verdict(False, f"not in the match: {', '.join(missing)}")
    return Verdict(True, "")


GUARDS = {"paraphrase": paraphrase_guard, "specifics": specifics_guard}


def _listing(items: list[str]) -> str:
    return ", ".join(items) if items else "(none)"
