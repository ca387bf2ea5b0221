"""A long-context task suite, generated offline and seeded, after RULER's synthetic tasks (Hsieh et al., 2024):
needle retrieval (`niah_*`), variable tracking (`vt`), common and frequent word extraction (`cwe`, `fwe`), and the
pass key. Every sample is built in token space to an exact length, so that samples of one task batch together:

    sample = build("niah_single", tokenizer, ctx=2048, seed=0, index=3)
    sample.context   # token ids: the instructions and the haystack with its needles, ctx - len(question) long
    sample.questions # token ids per question (the question, the end of the user's turn, the answer's prefix)
    sample.answers   # the strings each answer must contain (RULER's string_match_all)

A task's text follows RULER's templates (the needle "One of the special magic numbers for {key} is: {value}.",
its question and answer prefix; vt's chains of `VAR X = ...`; cwe's numbered word list; fwe's coded text), written
here from their description. Haystacks: `noise` (one repeated sentence group: the needle is the only outlier),
`essay` (everyday prose written for kvbench, prose.txt, its paragraphs in a seeded order per sample; RULER's is Paul
Graham's essays), `needle` (distractor needles), and the word list and coded text of cwe and fwe. Keys are words
from Python's own documentation (`pydoc_data.topics`), so nothing is downloaded. A needle goes between two sentences
at a depth drawn per sample, anywhere in the context (recorded in `depths`). vt and cwe have no one-shot example.
An answer may take `answer_budget` tokens: the longest way of writing its expected strings in the run's tokenizer,
plus a margin (tests/test_tasks.py checks every task's answers fit).

Several questions per context (`questions=n`): the needle tasks place n target needles (n chains for vt) and ask
for each in turn, which the `agnostic` and `multiturn` protocols (bench/eval/protocols.py) ask of one cache.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {kind} afterwards."
)
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
    "the value {value}, they are: "
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
    "frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
    "quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# No answer prefix: after " The pass key is" at the start of its turn a small chat model defines pass keys in general
# ("a magical item that can be used to unlock...", SmolLM2-135M, 8 samples of 8 at 2k); asked for the number alone it
# writes "The pass key is 48001." (PASSKEY_SAID, counted in the answer budget)
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_PREFIX = ""
PASSKEY_SAID = "The pass key is"
# A base model's plain completion prompt (no chat template) needs the prefix: without it Gemma 3 270M goes on with the
# question itself ("What is the pass key? Answer...", 3 samples of 4 at 1k)
PASSKEY_PLAIN_PREFIX = " The pass key is"

# task -> (haystack, key kind, value kind, target needles per question, values per key, keys asked per question,
#          distractor needles)
NIAH = {
    "niah_single": ("noise", "words", "numbers", 1, 1, 1, 0),
    "niah_single_essay": ("essay", "words", "numbers", 1, 1, 1, 0),
    "niah_single_uuid": ("essay", "words", "uuids", 1, 1, 1, 0),
    "niah_multikey": ("essay", "words", "numbers", 1, 1, 1, 3),
    "niah_multikey_needles": ("needle", "words", "numbers", 1, 1, 1, 0),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1, 0),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4, 0),
}
TASKS = ("vt", "cwe", "fwe", "passkey", "passkey_essay", *NIAH)
HAYSTACKS = {"vt": "noise", "cwe": "list", "fwe": "code", "passkey": "noise", "passkey_essay": "essay"}
HAYSTACKS.update({task: spec[0] for task, spec in NIAH.items()})
ANSWER_MARGIN = 8  # tokens allowed beyond the longest way of writing the expected answer (a closing phrase, a period)


@dataclass
class Sample:
    task: str
    context: list[int]  # token ids: instructions, haystack, needles (what the agnostic protocol compresses alone)
    questions: list[list[int]]  # token ids of each question, its turn's end and the answer's prefix
    answers: list[list[str]]  # per question: the strings the answer must contain
    max_new_tokens: int  # the answer budget: `answer_budget` of the answers
    depths: list[float] = field(default_factory=list)  # where each target starts, as a fraction of the context
    haystack: str = ""  # what the needles hide in: noise | essay (prose) | needle | list | code


def score(prediction: str, expected: list[str]) -> float:
    """RULER's string_match_all: the fraction of the expected strings the prediction contains (case-insensitive)."""
    text = prediction.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


@lru_cache(maxsize=1)
def _documentation() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Lowercase English words of 4-10 letters from Python's documentation, sorted (about 5k)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", _documentation()))))


class _Tokens:
    """Token ids of text pieces, cached per tokenizer: a haystack is built from a few pieces repeated."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer.encode(text)
        return self.cache[text]


_TOKENS: dict[int, _Tokens] = {}
PROSE = Path(__file__).with_name("prose.txt")


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    """The essay haystack's paragraphs: everyday prose written for kvbench (prose.txt, under the project's licence),
    no code, markup or digits."""
    return tuple(p.strip() for p in PROSE.read_text().split("\n\n") if p.strip())


def _stops(tokenizer) -> set[int]:
    """Token ids that end a sentence: a needle goes after one."""
    tok = _tokens(tokenizer)
    return {tok(" a.")[-1], tok(" a.\n")[-1], tok("\n")[-1]}


def _essay(tokenizer, rng: random.Random, n: int) -> list[int]:
    """n tokens of prose: the paragraphs in a seeded order (each sample its own), again in a new order if one pass
    is too short."""
    tok = _tokens(tokenizer)
    out: list[int] = []
    while len(out) < n:
        order = list(_paragraphs())
        rng.shuffle(order)
        for paragraph in order:
            out += tok(" " + paragraph + "\n")
    return out[:n]


def _tokens(tokenizer) -> _Tokens:
    return _TOKENS.setdefault(id(tokenizer), _Tokens(tokenizer))


def _turn(tokenizer, intro: str, question: str, prefix: str) -> tuple[str, str]:
    """The text before the haystack and after it: the user's turn holding the intro, the haystack and the question,
    in the model's chat template when it has one (else as plain text), then the answer's prefix."""
    marker = "\x00HAYSTACK\x00"
    content = f"{intro}\n{marker}\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:  # a plain completion prompt (a base model), after the start token the model expects, if any
        text = getattr(tokenizer, "bos_text", "") + content
    before, after = text.split(marker)
    return before, after + prefix


def _fill(pieces: list[list[int]], n: int) -> list[int]:
    """n token ids: the pieces repeated in order."""
    out: list[int] = []
    i = 0
    while len(out) < n:
        out += pieces[i % len(pieces)]
        i += 1
    return out[:n]


def build(
    task: str,
    tokenizer,
    ctx: int,
    seed: int,
    index: int,
    questions: int = 1,
    depth: float | None = None,
    question_tokens: int | None = None,
) -> Sample:
    """Sample `index` of `task` for a context of `ctx` tokens: the context and the first question together take
    ctx tokens (question_tokens: the question's length to plan for, when several samples are batched; default its
    own). depth: where the (first) target needle goes, as a fraction of the haystack; default drawn per sample.
    Deterministic for (task, ctx, seed, index, questions, depth)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid choices: {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{ctx}-{seed}-{index}")
    drawn = rng.random()  # drawn whatever `depth` says, so that the rest of the sample does not depend on it
    depth = drawn if depth is None else depth  # anywhere in the context, per sample
    if task in NIAH:
        return _niah(task, tokenizer, ctx, rng, questions, depth, question_tokens)
    return {"vt": _vt, "cwe": _cwe, "fwe": _fwe, "passkey": _passkey, "passkey_essay": _passkey}[task](
        task, tokenizer, ctx, rng, questions, depth, question_tokens
    )


def build_all(task: str, tokenizer, ctx: int, seed: int, count: int, questions: int = 1) -> list[Sample]:
    """Samples 0 .. count-1 of `task`, each planned for the widest first question among them: any batch of them
    shares one length, and a sample is the same whatever batch answers it."""
    first = [build(task, tokenizer, ctx, seed, i, questions) for i in range(count)]
    width = max(len(s.questions[0]) for s in first)
    return [build(task, tokenizer, ctx, seed, i, questions, question_tokens=width) for i in range(count)]


def _assemble(task, tokenizer, ctx, intro, question_texts, body, answers, depths, question_tokens, said="") -> Sample:
    """Tokenize the turn around the haystack and cut the haystack so that context + first question = ctx tokens.
    said: what the answer says before the expected strings where no answer prefix says it (in the answer budget)."""
    tok = _tokens(tokenizer)
    turns = [_turn(tokenizer, intro, q, p) for q, p in question_texts]
    head = tok(turns[0][0])
    questions = [tok(after) for _, after in turns]
    reserve = question_tokens if question_tokens is not None else len(questions[0])
    n = ctx - len(head) - reserve
    if n < 64:
        raise ValueError(f"ctx={ctx} is too short for {task}: the instructions and question take {ctx - n} tokens")
    haystack, starts = body(n)
    depths = [(len(head) + s) / ctx for s in starts] if starts else depths
    budget = answer_budget(tokenizer, answers, said)
    return Sample(task, head + haystack, questions, answers, budget, depths, HAYSTACKS[task])


def written(expected: list[str]) -> list[str]:
    """The ways an answer naming every expected string is written: a list in prose (": a, b, and c.") and numbered
    ("1. a 2. b 3. c")."""
    prose = expected[0] if len(expected) == 1 else ", ".join(expected[:-1]) + ", and " + expected[-1]
    return [f": {prose}.", " " + " ".join(f"{i + 1}. {e}" for i, e in enumerate(expected))]


def answer_budget(tokenizer, answers: list[list[str]], said: str = "") -> int:
    """Tokens an answer may take: the longest way of writing the longest expected answer in this tokenizer (a
    tokenizer that splits numbers into digits makes a 7-digit value 7 tokens), after `said`, plus ANSWER_MARGIN."""
    texts = [said + text for expected in answers for text in written(expected)]
    return max(len(tokenizer.encode(text)) for text in texts) + ANSWER_MARGIN


def _key(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    words = _words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _niah(task, tokenizer, ctx, rng, n_questions, depth, question_tokens) -> Sample:
    haystack, key_kind, value_kind, _, n_values, n_asked, distractors = NIAH[task]
    tok = _tokens(tokenizer)
    n_keys = n_asked * n_questions + distractors
    keys: list[str] = []
    while len(keys) < n_keys:
        key = _key(rng, key_kind)
        keys += [key] if key not in keys else []
    values = {k: [_key(rng, value_kind) for _ in range(n_values)] for k in keys}
    kind = value_kind
    asked = [keys[i * n_asked : (i + 1) * n_asked] for i in range(n_questions)]
    targets = [NEEDLE.format(kind=kind, key=k, value=v) for query in asked for k in query for v in values[k]]
    others = [NEEDLE.format(kind=kind, key=k, value=v) for k in keys[n_asked * n_questions :] for v in values[k]]
    needles = targets + others  # the first target at `depth`, the others at seeded depths
    question_texts, answers = [], []
    for query_keys in asked:
        query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
        q, p = NIAH_QUESTION.format(kind=kind, query=query), NIAH_PREFIX.format(kind=kind, query=query)
        if len(query_keys) * n_values == 1:  # one value asked: RULER's singular wording
            q = q.replace("are all", "is").replace(kind, kind[:-1])
            p = p.replace(" are", " is").replace(kind, kind[:-1])
        question_texts.append((q, p))
        answers.append([v for k in query_keys for v in values[k]])
    intro = NIAH_INTRO.format(kind=kind)
    if n_values * n_keys == 1:
        intro = intro.replace("Some", "A").replace(" are ", " is ").replace(f"the {kind}", f"the {kind[:-1]}")
        intro = intro.replace(f"magic {kind}", f"magic {kind[:-1]}")

    def body(n: int) -> tuple[list[int], list[int]]:
        """The haystack and where each target needle starts."""
        if haystack == "noise":
            pieces = [tok(" " + NOISE)]
        elif haystack == "essay":
            pieces = [_essay(tokenizer, rng, n)]
        else:  # distractor needles as the haystack
            fake = [NEEDLE.format(kind=kind, key=_key(rng, key_kind), value=_key(rng, value_kind)) for _ in range(64)]
            pieces = [tok(" " + f) for f in fake]
        needle_ids = [tok(" " + s + " ") for s in needles]
        ids, starts = _insert(pieces, needle_ids, n, depth, rng, _stops(tokenizer))
        return ids, starts[: len(targets)]

    return _assemble(task, tokenizer, ctx, intro, question_texts, body, answers, [depth], question_tokens)


def _sentence_start(filler: list[int], at: int, stops: set[int]) -> int:
    """The start of the sentence holding token `at`: just after the last token in `stops` (a period, a line's end)
    before it, within 64 tokens (else `at` itself)."""
    for i in range(at, max(0, at - 64) - 1, -1):
        if i == 0 or filler[i - 1] in stops:
            return i
    return at


def _insert(
    pieces: list[list[int]],
    needle_ids: list[list[int]],
    n: int,
    depth: float,
    rng: random.Random,
    stops: set[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """A haystack of n tokens from the pieces with every needle inserted whole, between two sentences (after a token
    of `stops`): the first at `depth`, the others at seeded depths. Returns (ids, the token index where each needle
    starts, in the order given)."""
    room = n - sum(len(x) for x in needle_ids)
    if room < 16:
        raise ValueError(f"a haystack of {n} tokens cannot hold {len(needle_ids)} needles")
    filler = _fill(pieces, room)
    at = [_sentence_start(filler, int(depth * room), stops)]
    at += [_sentence_start(filler, rng.randrange(0, room), stops) for _ in needle_ids[1:]]
    order = sorted(range(len(needle_ids)), key=lambda i: (at[i], i))
    out, starts, prev = [], [0] * len(needle_ids), 0
    for i in order:
        out += filler[prev : at[i]]
        starts[i] = len(out)
        out += needle_ids[i]
        prev = at[i]
    out += filler[prev:]
    return out, starts


def _vt(task, tokenizer, ctx, rng, n_questions, depth, question_tokens) -> Sample:
    """Chains of five variables, `VAR ABCDE = 12345` then `VAR FGHIJ = VAR ABCDE` ..., one chain per question,
    their lines spread in order among noise lines; the answer is every variable of the chain asked."""
    tok = _tokens(tokenizer)
    names: list[str] = []
    while len(names) < 5 * n_questions:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        names += [name] if name not in names else []
    chains, question_texts, answers = [], [], []
    for c in range(n_questions):
        chain = names[5 * c : 5 * c + 5]
        value = str(rng.randint(10000, 99999))
        lines = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
        chains.append(lines)
        question_texts.append((VT_QUESTION.format(value=value), VT_PREFIX.format(n=5, value=value)))
        answers.append(chain)

    def body(n: int) -> tuple[list[int], list[int]]:
        noise = tok(NOISE + "\n")
        lines = [tok(line + ".\n") for chain in chains for line in chain]
        slots = (n - sum(len(x) for x in lines)) // len(noise)
        if slots < len(lines):
            raise ValueError(f"a haystack of {n} tokens cannot hold {len(lines)} assignment lines")
        first = min(slots - len(lines), int(depth * n / len(noise)))  # its first line at `depth` of n tokens
        rest = sorted(rng.sample(range(first + 1, slots + 1), len(lines) - 1)) if len(lines) > 1 else []
        at = {first: 0, **{p: i + 1 for i, p in enumerate(rest)}}
        out: list[int] = []
        for s in range(slots + 1):
            if s in at:
                out += lines[at[s]]
            if s < slots:
                out += noise
        out += noise * (n // len(noise))
        return out[:n], []

    return _assemble(task, tokenizer, ctx, VT_INTRO, question_texts, body, answers, [depth], question_tokens)


def _cwe(task, tokenizer, ctx, rng, n_questions, depth, question_tokens) -> Sample:
    """A numbered list: 10 common words repeated (30 times from 4k tokens, 6 below), the others fewer times (3, or
    once below 4k), shuffled; the answer is the 10 common words."""
    tok = _tokens(tokenizer)
    common_n, rare_n = (30, 3) if ctx >= 4096 else (6, 1)
    words = list(_words())
    rng.shuffle(words)
    common = words[:10]

    def listing(rare: int) -> list[int]:
        shuffled = common * common_n + words[10 : 10 + rare] * rare_n
        random.Random(f"{rare}-{common[0]}").shuffle(shuffled)
        return tok(" ".join(f"{i + 1}. {w}" for i, w in enumerate(shuffled)))

    def body(n: int) -> tuple[list[int], list[int]]:
        nonlocal common_n
        while common_n > 2 * rare_n + 1 and len(listing(0)) > n:  # long words, few tokens: fewer repeats
            common_n -= 1
        per_word = len(listing(100)) / (10 * common_n + 100 * rare_n)  # tokens per listed word, measured
        rare = min(len(words) - 10, max(0, int((n / per_word - 10 * common_n) / rare_n)))
        ids = listing(rare)
        while len(ids) > n and rare > 0:  # the estimate was long: fewer rare words until it fits
            rare = max(0, rare - max(1, rare // 20))
            ids = listing(rare)
        if len(ids) > n:
            raise ValueError(f"a list of {n} tokens cannot hold the common words")
        return ids + tok("\n") * (n - len(ids)), []

    question_texts = [(CWE_QUESTION, CWE_PREFIX)] * n_questions
    return _assemble(task, tokenizer, ctx, CWE_INTRO, question_texts, body, [common] * n_questions, [], question_tokens)


def _fwe(task, tokenizer, ctx, rng, n_questions, depth, question_tokens) -> Sample:
    """Coded text: random 6-letter words whose counts follow Zipf's law (exponent 2), the most frequent being dots
    ('....', to ignore); the answer is the next three."""
    tok = _tokens(tokenizer)
    vocab = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(ctx // 50)})
    rng.shuffle(vocab)
    vocab[0] = "...."
    zeta = sum(k**-2.0 for k in range(1, 10_000))

    def body(n: int) -> tuple[list[int], list[int]]:
        total = n // 2
        while True:
            counts = [int(total * (k + 1) ** -2.0 / zeta) for k in range(len(vocab))]
            text = [w for w, c in zip(vocab, counts) for _ in range(c)]
            random.Random(total).shuffle(text)
            ids = tok(" ".join(text))
            if len(ids) <= n or total < 10:
                return ids[:n] + tok("\n") * (n - len(ids)), []
            total = int(total * 0.9)

    question_texts = [(FWE_QUESTION, FWE_PREFIX)] * n_questions
    return _assemble(
        task, tokenizer, ctx, FWE_INTRO, question_texts, body, [vocab[1:4]] * n_questions, [], question_tokens
    )


def _passkey(task, tokenizer, ctx, rng, n_questions, depth, question_tokens) -> Sample:
    """A 5-digit key at `depth` of noise sentences; one key, asked once (however many questions)."""
    tok = _tokens(tokenizer)
    key = str(rng.randint(10000, 99999))

    def body(n: int) -> tuple[list[int], list[int]]:
        pieces = [_essay(tokenizer, rng, n)] if HAYSTACKS[task] == "essay" else [tok(" " + NOISE)]
        needle = [tok(" " + PASSKEY_NEEDLE.format(key=key) + " ")]
        return _insert(pieces, needle, n, depth, rng, _stops(tokenizer))

    chat = bool(getattr(tokenizer, "chat_template", None))
    prefix, said = (PASSKEY_PREFIX, PASSKEY_SAID) if chat else (PASSKEY_PLAIN_PREFIX, "")
    question_texts = [(PASSKEY_QUESTION, prefix)] * n_questions
    answers = [[key]] * n_questions
    return _assemble(task, tokenizer, ctx, PASSKEY_INTRO, question_texts, body, answers, [depth], question_tokens, said)
