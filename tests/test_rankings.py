"""Rankings from kept answers: every answer written beside its row and read back on resume (bench/results/records.py),
intervals and paired tests against brute-force references (bench/results/stats.py), and the leaderboard built from
them."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from char_tokenizer import CharTokenizer

from bench.config.schema import EvalConfig
from bench.eval import protocols, quality
from bench.results import records, rows, stats
from bench.results.tables import ranked_leaderboard
from bench.systems.kvbench import KvbenchSystem

TOK = CharTokenizer()


# ---- intervals and tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 8), (3, 8), (8, 8), (41, 50), (17, 120)])
def test_wilson_is_the_set_of_proportions_the_score_test_does_not_reject(k, n):
    """The interval's ends are where |k/n - p| = z sqrt(p (1 - p) / n), found here by scanning p on a fine grid."""
    grid = np.linspace(0, 1, 200_001)
    inside = grid[np.abs(k / n - grid) <= stats.Z95 * np.sqrt(grid * (1 - grid) / n)]
    low, high = stats.wilson(k, n)
    assert abs(low - inside.min()) <= 1e-5 and abs(high - inside.max()) <= 1e-5


@pytest.mark.parametrize("wins, losses", [(0, 0), (0, 3), (1, 7), (4, 4), (9, 2), (0, 12)])
def test_the_sign_test_counts_every_equally_likely_outcome(wins, losses):
    """p = the share of the 2^n fair-coin outcomes at least as lopsided as the one seen."""
    n = wins + losses
    seen = abs(wins - losses)
    outcomes = [sum(flips) for flips in itertools.product((0, 1), repeat=n)]
    p = sum(abs(2 * w - n) >= seen for w in outcomes) / len(outcomes)
    assert math.isclose(stats.sign_test(wins, losses), p, rel_tol=1e-12)


def test_the_bootstrap_covers_the_mean_and_narrows_with_samples():
    rng = np.random.default_rng(1)
    few = {t: rng.random(10).round(1) for t in ("a", "b")}
    many = {t: rng.random(400).round(1) for t in ("a", "b")}
    for by_task in (few, many):
        low, high = stats.bootstrap(by_task)
        mean = np.mean([s.mean() for s in by_task.values()])
        assert low < mean < high
    assert np.subtract(*stats.bootstrap(many)[::-1]) < np.subtract(*stats.bootstrap(few)[::-1]) / 3


def _records(config: str, cache: str, wrong: set[int], n: int = 50) -> list[dict]:
    return [
        {"config_hash": config, "task": "t", "sample": i, "question": 0, "score": 0.0 if i in wrong else 1.0,
         "protocol": "aware", "ctx": 1000, "cache": cache, "cache_budget": 250.0, "label": cache, "method": cache,
         "system": "kvbench"}
        for i in range(n)
    ]  # fmt: skip


def test_a_ranking_ties_what_a_paired_test_cannot_separate():
    """On the same 50 samples: dense right on all, A wrong on 1, B wrong on 10, C wrong on 2. A is the best of its
    budget; C is tied with it, B below it (9 answers differ, all in A's favour); only B differs from dense."""
    df = pd.DataFrame(
        _records("d", "dense", set())
        + _records("a", "a", {7})
        + _records("b", "b", set(range(10)))
        + _records("c", "c", {3, 4})
    )
    ranking = stats.rank(df).set_index("config_hash")
    assert list(ranking.index) == ["d", "a", "c", "b"]
    assert ranking.loc["a", "tied_best"] and ranking.loc["c", "tied_best"] and not ranking.loc["b", "tied_best"]
    assert math.isclose(ranking.loc["b", "best_p"], stats.sign_test(0, 9))  # a wrong on 7, b on 0..9: 9 differ
    assert ranking.loc["b", "vs_dense"] == "0-10" and not ranking.loc["b", "tied_dense"]
    assert ranking.loc["a", "tied_dense"] and ranking.loc["c", "tied_dense"]
    low, high = ranking.loc["b", ["low", "high"]]
    assert (low, high) == pytest.approx(stats.wilson(40, 50))


def test_each_model_and_context_is_ranked_apart():
    """Two models' dense and one cache each, on their own samples: each cache is compared with its own model's dense
    and best, never with the other model's (whose dense is right everywhere); the table says which model is which."""
    df = pd.DataFrame(
        [{**r, "model": "m1"} for r in _records("d1", "dense", set(range(20))) + _records("a1", "a", set(range(25)))]
        + [{**r, "model": "m2"} for r in _records("d2", "dense", set()) + _records("a2", "a", set(range(30)))]
    )
    ranking = stats.rank(df).set_index("config_hash")
    assert list(ranking.index) == ["d1", "a1", "d2", "a2"]
    assert ranking.loc["d1", "tied_best"] and ranking.loc["a1", "vs_dense"] == "0-5"  # against m1's dense alone
    assert ranking.loc["a2", "vs_dense"] == "0-30"  # against m2's dense alone
    board_rows = pd.DataFrame(
        {"config_hash": ["d1", "a1", "d2", "a2"], "status": "ok", "model": ["m1", "m1", "m2", "m2"],
         "cache": ["dense", "a", "dense", "a"], "cache_bytes": 1, "peak_alloc_bytes": 1, "decode_ms_p50": 1.0}
    )  # fmt: skip
    board = ranked_leaderboard(board_rows, df)
    assert "| model | protocol | budget |" in board and "| m2 | aware | all | dense |" in board


# ---- records: written, resumed, read ---------------------------------------------------------------------------------


def _system(tiny, cache: str = "dense", length: int = 0, decode: str = "evict") -> KvbenchSystem:
    return KvbenchSystem.around(tiny.requires_grad_(False), TOK, cache, length, 1024, decode)


def test_a_job_keeps_every_answer_and_reads_them_back_on_resume(tiny, tmp_path, monkeypatch):
    knobs = EvalConfig(tasks=True, suite=["niah_single", "passkey"], samples=3, batch=2)
    run = quality.Answering(_system(tiny).cache, "aware", tmp_path / "records" / "abc", "abc")
    assert quality.suite(_system(tiny), 512, knobs, [run]) == 6
    kept = records.load(tmp_path, pd.DataFrame({"config_hash": ["abc"], "label": ["dense"]}))
    assert len(kept) == 6 and set(kept["task"]) == {"niah_single", "passkey"} and set(kept["sample"]) == {0, 1, 2}
    assert kept["expected"].str.len().min() > 0 and kept["depth"].between(0, 1).all()
    assert (kept["answer_budget"] >= kept["answer_tokens"]).all() and set(kept["prefill"]) == {"shared"}
    assert rows.load(tmp_path).empty  # answers are not rows

    def refuse(*args, **kwargs):
        raise AssertionError("a task with records is not answered again")

    monkeypatch.setattr(protocols, "run", refuse)
    again = quality.Answering(run.cache, "aware", run.folder, "abc")
    assert quality.suite(_system(tiny), 512, knobs, [again]) == 0
    assert again.accuracies() == run.accuracies()


def test_configurations_answered_together_answer_as_each_does_alone(tiny, monkeypatch):
    """h2o and snapkv at 64 slots and dense, under both protocols, in one pass (one recorded prefill per batch) give
    the answers each gives alone through its own prefill."""
    knobs = EvalConfig(tasks=True, suite=["niah_single"], samples=2, batch=2)
    configs = [("dense", 0, "aware"), ("h2o", 64, "aware"), ("snapkv", 64, "agnostic"), ("h2o", 64, "agnostic")]
    together = [quality.Answering(_system(tiny, c, n).cache, p) for c, n, p in configs]
    recorded = []
    record = KvbenchSystem.record
    monkeypatch.setattr(KvbenchSystem, "record", lambda self, ids: recorded.append(ids.shape) or record(self, ids))
    quality.suite(_system(tiny), 512, knobs, together)
    assert recorded == [(2, 512)]  # aware: context and question, ctx tokens; agnostic: loaded from its first tokens
    monkeypatch.setattr(KvbenchSystem, "shares_prompt", lambda self, length: False)
    for run, (cache, n, protocol) in zip(together, configs):
        alone = quality.Answering(_system(tiny, cache, n).cache, protocol)
        quality.suite(_system(tiny, cache, n), 512, knobs, [alone])
        assert [r["answer"] for r in alone.records["niah_single"]] == [r["answer"] for r in run.records["niah_single"]]
        assert run.paths == {"shared"} and alone.paths == {"own"}


def test_decode_modes_answered_together_answer_as_each_does_alone(tiny):
    """knorm evicting and appending, and last_recent appending, under aware, two batches in one pass (a recorded
    prefill loaded, a window's context copied): each mode's answers are the ones it gives alone, and each batch starts
    from the prompt's caches, not the previous batch's appending ones."""
    knobs = EvalConfig(tasks=True, suite=["niah_single"], samples=4, batch=2)
    configs = [("knorm", 64, "evict"), ("knorm", 64, "append"), ("last_recent", 96, "append")]
    together = [quality.Answering(_system(tiny, c, n, m).cache, "aware") for c, n, m in configs]
    quality.suite(_system(tiny), 512, knobs, together)
    for run, (cache, n, mode) in zip(together, configs):
        alone = quality.Answering(_system(tiny, cache, n, mode).cache, "aware")
        quality.suite(_system(tiny, cache, n, mode), 512, knobs, [alone])
        assert [r["answer"] for r in alone.records["niah_single"]] == [r["answer"] for r in run.records["niah_single"]]


def test_a_reply_is_read_to_its_own_samples_budget_whatever_its_batch_generated():
    generated = [
        torch.tensor([TOK.encode("abcdefgh"), TOK.encode("abc") + [TOK.eos_id] + TOK.encode("defg")])
    ]  # (2, 8): the second ends after three tokens
    first, second = protocols.texts(TOK, generated, TOK.eos_id, [3, 8])
    assert first == [protocols.Reply("abc", 3, 3, True)] and second == [protocols.Reply("abc", 3, 8, False)]


@pytest.mark.numeric
def test_a_window_caches_context_prefill_serves_both_protocols(tiny, monkeypatch):
    """last_recent at 96 slots (a 2-sample batch of 512 tokens) under aware and agnostic, answered together: one
    prefill of each batch's context, copied, serves both (aware's question then a call of its own), and each answer
    is the one its configuration gives alone, in one call. A quantized window is not copied: it prefills alone."""
    knobs = EvalConfig(tasks=True, suite=["niah_single"], samples=4, batch=2)
    configs = [("last_recent", 96, "aware"), ("last_recent", 96, "agnostic")]
    together = [quality.Answering(_system(tiny, c, n).cache, p) for c, n, p in configs]
    copies = []
    snapshot = KvbenchSystem.snapshot
    monkeypatch.setattr(KvbenchSystem, "snapshot", lambda self: copies.append(1) or snapshot(self))
    quality.suite(_system(tiny), 512, knobs, together)
    assert len(copies) == 2  # one per batch
    for run, (cache, n, protocol) in zip(together, configs):
        alone = quality.Answering(_system(tiny, cache, n).cache, protocol)
        quality.suite(_system(tiny, cache, n), 512, knobs, [alone])
        assert [r["answer"] for r in alone.records["niah_single"]] == [r["answer"] for r in run.records["niah_single"]]
        assert run.paths == {"own"} == alone.paths
    for buffer, copied in [("float", True), ("int8", False)]:
        system = KvbenchSystem.around(tiny, TOK, "last_recent", 96, 1024, buffer=buffer)
        system.open(1, 200)
        assert system.chunks_as_one() == copied


def test_the_leaderboard_is_ranked_from_the_records():
    df = pd.DataFrame(_records("d", "dense", set()) + _records("b", "b", set(range(10))))
    board_rows = pd.DataFrame(
        {"config_hash": ["d", "b"], "status": ["ok", "ok"], "model": ["m", "m"], "cache": ["dense", "b"],
         "cache_bytes": [100, 25], "peak_alloc_bytes": [1000, 900], "decode_ms_p50": [1.0, 1.0]}
    )  # fmt: skip
    board = ranked_leaderboard(board_rows, df)
    assert "0.80 [0.67, 0.89]" in board and "**0-10, p=0.002**" in board


def test_one_policy_in_two_implementations_is_compared_on_the_same_answers():
    """kvpress's snapkv (peer snapkv) wrong on samples 0-9, kvbench's on 10-11, at the same budget and protocol: the
    pair's line gives both accuracies and the sign test on the 12 answers that differ (2-10, p = 0.039); kvpress's
    streaming_llm finds its peer by `peer`, last_recent; a policy kvbench does not run at that budget has no line."""
    ours = _records("s", "snapkv", {10, 11})
    theirs = [dict(r, config_hash="k", label="kvpress/snapkv", system="kvpress", score=float(r["sample"] >= 10))
              for r in ours]  # fmt: skip
    window = [dict(r, config_hash="w", cache="last_recent", label="last_recent") for r in ours]
    stream = [dict(r, config_hash="x", cache="streaming_llm", label="kvpress/streaming_llm", system="kvpress")
              for r in ours]  # fmt: skip
    alone = [dict(r, config_hash="y", cache="tova", label="kvpress/tova", system="kvpress") for r in ours]
    df = pd.DataFrame(ours + theirs + window + stream + alone)
    df["peer"] = df["cache"].replace({"streaming_llm": "last_recent"})
    pairs = stats.implementations(df).set_index("label")
    assert set(pairs.index) == {"kvpress/snapkv", "kvpress/streaming_llm"}
    snap = pairs.loc["kvpress/snapkv"]
    assert (snap["accuracy"], snap["reference"], snap["wins_losses"]) == (0.8, 0.96, "2-10")
    assert snap["p"] == pytest.approx(sum(math.comb(12, k) for k in (0, 1, 2)) * 2 / 2**12)
    assert pairs.loc["kvpress/streaming_llm", "wins_losses"] == "0-0"


def test_under_aware_an_implementation_is_compared_with_the_same_decode_mode():
    """kvpress appends decoded tokens: under aware its snapkv pairs with kvbench's `snapkv+append` (the same answers:
    0-0), not with the evicting snapkv (wrong on 10-11); under agnostic both modes answer alike and the row without
    a mode (the evicting one) is its reference, the appending one answering there too. kvpress answered 25 of the 50
    samples: both accuracies are over those."""
    evict = _records("s", "snapkv", {10, 11})
    append = [dict(r, config_hash="a", label="snapkv+append", decode="append") for r in _records("a", "snapkv", set())]
    theirs = [dict(r, config_hash="k", label="kvpress/snapkv", system="kvpress", decode="append")
              for r in _records("k", "snapkv", set(), n=25)]  # fmt: skip
    agnostic = [dict(r, config_hash=r["config_hash"] + "g", protocol="agnostic") for r in evict + append + theirs]
    df = pd.DataFrame(evict + append + theirs + agnostic)
    df["peer"] = df["cache"]
    pairs = stats.implementations(df).set_index("protocol")
    assert len(pairs) == 2 and set(pairs["label"]) == {"kvpress/snapkv"}
    assert pairs.loc["aware", "wins_losses"] == "0-0" and pairs.loc["aware", "reference"] == 1.0
    assert pairs.loc["agnostic", "wins_losses"] == "2-0" and pairs.loc["agnostic", "reference"] == 0.92


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield
