"""The long-context task suite (bench/eval/tasks.py) and its protocols (bench/eval/protocols.py): generators
deterministic and placing their needles where asked, RULER's scorer, what each protocol does to the caches, and on
SmolLM2 that the suite separates a cache that keeps the needle from one that cannot."""

import pytest
import torch
from char_tokenizer import CharTokenizer

from bench.config.schema import EvalConfig
from bench.eval import protocols, tasks
from bench.eval.quality import Answering, suite
from bench.systems.kvbench import KvbenchSystem
from caches import frozen

TOK = CharTokenizer()


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_is_deterministic_and_exactly_as_long_as_asked(task):
    a = tasks.build(task, TOK, 4096, seed=1, index=2)
    b = tasks.build(task, TOK, 4096, seed=1, index=2)
    c = tasks.build(task, TOK, 4096, seed=2, index=2)
    assert (a.context, a.questions, a.answers) == (b.context, b.questions, b.answers)
    assert a.answers != c.answers
    assert len(a.context) + len(a.questions[0]) == 4096
    text = TOK.decode(a.context)
    assert all(answer in text for answer in a.answers[0]) or task in ("cwe", "fwe")  # counted, not quoted
    wider = tasks.build(task, TOK, 4096, seed=1, index=2, question_tokens=len(a.questions[0]) + 7)
    assert len(wider.context) == len(a.context) - 7 and wider.questions == a.questions and wider.answers == a.answers


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "passkey", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75])
def test_the_needle_sits_at_the_requested_depth(task, depth):
    """The first target needle (the chain's first line for vt) starts at `depth` of the haystack, within one noise
    sentence (the haystack is cut at whole pieces)."""
    sample = tasks.build(task, TOK, 4096, seed=0, index=0, depth=depth)
    text = TOK.decode(sample.context)
    marker = {"passkey": "The pass key is", "vt": "VAR "}.get(task) or f"for {sample.answers[0][0]}"
    if task.startswith("niah"):  # the needle names its key before its value
        marker = next(s for s in text.split("One of the special magic")[1:] if sample.answers[0][0] in s)[:40]
    start = text.index("\n") + 1  # the haystack begins after the instructions
    found = (text.index(marker) - start) / (len(text) - start)
    assert abs(found - depth) <= 0.03, (found, depth)
    if task != "vt":  # recorded as where it starts in the whole context (instructions included)
        assert abs(sample.depths[0] - text.index(marker) / 4096) <= 0.03


@pytest.mark.parametrize("task", ["niah_single", "niah_single_essay", "passkey", "passkey_essay"])
def test_depths_are_drawn_across_the_whole_context_per_sample(task):
    """Without `depth`, each sample draws its own: over 40 samples they cover the context from near its start to
    near its end, not a few fixed points."""
    depths = [tasks.build(task, TOK, 2048, seed=0, index=i).depths[0] for i in range(40)]
    assert len(set(depths)) >= 25  # (a needle starts a sentence: close draws share one)
    assert {int(d * 5) for d in depths} == {0, 1, 2, 3, 4}  # every fifth of the context holds some


def test_a_needle_goes_between_two_sentences_of_the_prose():
    sample = tasks.build("niah_single_essay", TOK, 2048, seed=0, index=5, depth=0.5)
    text = TOK.decode(sample.context)
    before = text[: text.index(" One of the special magic")]
    assert before.rstrip(" ").endswith((".", "\n")), before[-40:]
    assert sample.haystack == "essay"


def test_the_essay_haystack_is_prose_without_digits_or_markup():
    paragraphs = tasks._paragraphs()
    assert len(paragraphs) >= 20
    text = " ".join(paragraphs)
    assert not any(ch.isdigit() for ch in text) and not any(ch in text for ch in "<>{}[]=_#`")
    a, b = (TOK.decode(tasks.build("passkey_essay", TOK, 2048, seed=0, index=i).context[:600]) for i in (0, 1))
    assert a != b  # each sample its own order of paragraphs


@pytest.mark.parametrize("ctx", [1024, 2048, 4096])
def test_every_expected_answer_fits_its_budget_in_the_real_tokenizer(smollm2, ctx):
    """SmolLM2's tokenizer splits numbers into digits: four 7-digit values written out take about 38 tokens. The
    budget must hold the answer written either way (a list in prose, numbered), after what the model restates where
    no answer prefix says it, for every task, question and seed; and stay an answer's length (no blanket cap)."""
    _, tok = smollm2
    for task in tasks.TASKS:
        for seed in (0, 1):
            for index in range(3):
                sample = tasks.build(task, tok, ctx, seed, index, questions=2 if task.startswith("niah") else 1)
                said = tasks.PASSKEY_SAID if task.startswith("passkey") else ""
                texts = [said + text for expected in sample.answers for text in tasks.written(expected)]
                longest = max(len(tok.encode(text)) for text in texts)  # the sample's answers share one budget
                assert longest <= sample.max_new_tokens <= longest + tasks.ANSWER_MARGIN, (task, texts)
                for expected in sample.answers:
                    prose = said + ": " + ", ".join(expected) + "."  # written independently of `written`
                    assert len(tok.encode(prose)) <= sample.max_new_tokens, (task, prose)
    multivalue = tasks.build("niah_multivalue", tok, ctx, 0, 0)
    assert multivalue.max_new_tokens > 32  # the old fixed cap of 32 could not hold its answer


def test_a_plain_prompt_ends_the_pass_key_with_its_answer_prefix():
    """A model without a chat template (a base model) gets the pass-key question as plain text followed by " The pass
    key is"; a chat model's turn ends with the question, and its answer budget holds what it restates."""

    class ChatTokenizer(CharTokenizer):
        chat_template = "chat"

        def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
            return "<user>" + messages[0]["content"] + "<end><model>"

    plain, chat = (tasks.build("passkey", tok, 1024, 0, 0) for tok in (TOK, ChatTokenizer()))
    assert TOK.decode(plain.questions[0]).endswith(tasks.PASSKEY_QUESTION + tasks.PASSKEY_PLAIN_PREFIX)
    assert TOK.decode(chat.questions[0]).endswith(tasks.PASSKEY_QUESTION + "<end><model>")
    for sample, said in ((plain, ""), (chat, tasks.PASSKEY_SAID)):
        longest = max(len(TOK.encode(said + text)) for text in tasks.written(sample.answers[0]))
        assert sample.max_new_tokens == longest + tasks.ANSWER_MARGIN


def test_the_scorer_is_rulers_string_match_all():
    assert tasks.score(" The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert tasks.score("1234567 only", ["1234567", "7654321"]) == 0.5
    assert tasks.score("nothing here", ["1234567"]) == 0.0
    assert tasks.score("ABCDE fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive


def _samples(task: str, n: int, questions: int, ctx: int = 2048) -> list[tasks.Sample]:
    first = [tasks.build(task, TOK, ctx, 0, i, questions) for i in range(n)]
    width = max(len(s.questions[0]) for s in first)
    return [tasks.build(task, TOK, ctx, 0, i, questions, question_tokens=width) for i in range(n)]


def test_agnostic_asks_every_question_of_the_same_compressed_cache(tiny, monkeypatch):
    """The context is compressed once; before each question the compressed cache keeps the same tokens, and the
    question and answer tokens go after it, none evicted."""
    seen = []
    real = frozen.FrozenPrefixCache.__init__

    def spy(self, base, slots):
        seen.append(base.token_positions().clone())
        real(self, base, slots)

    monkeypatch.setattr(frozen.FrozenPrefixCache, "__init__", spy)
    samples = _samples("niah_multiquery", 2, questions=3)
    replies = protocols.run(KvbenchSystem.around(tiny, TOK, "h2o", 128, 256), samples, "agnostic")
    layers = tiny.config.n_layer
    assert len(seen) == 3 * layers and len(replies) == 2 and all(len(r) == 3 for r in replies)
    assert seen[0].shape[-1] == 128  # compressed to the budget
    for q in range(1, 3):
        assert all(torch.equal(seen[layer], seen[q * layers + layer]) for layer in range(layers))


def test_multiturn_keeps_earlier_answers_in_the_cache(tiny, monkeypatch):
    """One cache through the whole conversation: when the second question comes, the first answer's tokens are in
    the cache (dense: every position up to there)."""
    states = []
    real = protocols.decode

    def spy(step, logits, start, steps, eos):
        out = real(step, logits, start, steps, eos)
        states.append((start, out[1], tiny.kv_caches[0].token_positions()[0, 0].tolist()))
        return out

    monkeypatch.setattr(protocols, "decode", spy)
    samples = _samples("niah_single", 2, questions=2)
    protocols.run(KvbenchSystem.around(tiny, TOK, prefill_chunk=256), samples, "multiturn")
    (start1, last1, _), (start2, _, kept2) = states
    assert start2 > last1 >= start1
    assert set(range(start1, last1)) <= set(kept2)  # the first answer, fed back, stayed in the cache
    assert kept2 == list(range(len(kept2)))


@pytest.mark.slow
def test_dense_finds_the_needle_and_a_64_token_cache_does_not(smollm2):
    """SmolLM2-135M, niah_single at 1k, aware protocol, 4 samples (needles at depths spread over the context)."""
    model, tok = smollm2
    knobs = EvalConfig(suite=["niah_single"], samples=4, batch=4)

    def accuracy(system) -> float:
        run = Answering(system.cache, "aware")
        suite(system, 1024, knobs, [run])
        return run.accuracies()["niah_single"]

    dense = accuracy(KvbenchSystem.around(model, tok, prefill_chunk=1024))
    small = accuracy(KvbenchSystem.around(model, tok, "last_recent", 64, 1024, sink_tokens=4))
    assert dense >= 0.9 and small < dense, (dense, small)
