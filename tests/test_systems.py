"""Other libraries' caches as systems of the harness (bench/systems): on the same weights, every system's dense run
gives kvbench's greedy tokens; the bytes each holds are measured, not taken from its settings; the task suite's
protocols ask other systems the same questions in the same positions."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from bounds import assert_within, bound, model_terms
from char_tokenizer import CharTokenizer
from hydra import compose, initialize_config_dir

from bench import systems
from bench.config.spec import resolve
from bench.eval import protocols, tasks
from bench.run import CONF_DIR
from bench.systems.kvbench import KvbenchSystem
from model.config import Config

pytest.importorskip("transformers")
CTX, STEPS = 64, 12
TOK = CharTokenizer()


def spec(system: str, *more: str):
    overrides = [f"system={system}", "model=tiny", f"ctx={CTX}", f"new_tokens={STEPS}", "batch=2", "device=cpu"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return resolve(compose(config_name="config", overrides=[*overrides, *more]))


def reorder(config, logits: torch.Tensor, keys: int = CTX + STEPS) -> float:
    """Another library's computation of the same logits: within the rounding of their sums (tests/bounds.py)."""
    return bound(logits, model_terms(config, keys))


def with_length(job, length: int):
    """The same job with `length` cache slots per sequence (a budget no fraction of ctx gives)."""
    return dataclasses.replace(job, cache=dataclasses.replace(job.cache, length=length))


@torch.inference_mode()
def greedy(system, ids: torch.Tensor) -> torch.Tensor:
    tokens = [system.prefill(ids)]
    for i in range(STEPS - 1):
        tokens.append(system.decode(tokens[-1], CTX + i))
    return torch.cat(tokens, 1)  # (B, STEPS)


def dense_runs():
    """(label, spec) of every system run so that it keeps every token: HF's dense caches, the sliding window wider
    than the sequence, and each press of kvpress with a budget above any prompt's length (compression ratio 0)."""
    runs = [(name, spec(name)) for name in ("hf_dynamic", "hf_static", "hf_static_compiled")]
    sliding = spec("hf_sliding", "cache.budget=1.0")
    runs.append(("hf_sliding", with_length(sliding, CTX + STEPS)))
    if systems.missing_extra("kvpress") is None:
        from bench.systems.kvpress import PRESSES

        for press in PRESSES:
            keep_all = with_length(spec("kvpress", f"press={press}", "cache.budget=1.0"), 1 << 20)
            runs.append((f"kvpress/{press}", keep_all))
    return runs


@pytest.mark.numeric
@torch.inference_mode()
def test_every_system_gives_kvbench_greedy_tokens():
    """Two sequences, a prefill of 64 tokens and 11 decode steps per system (HF's compiled StaticCache compiled as
    `generate` compiles it). Implementations round differently (within `reorder`); the check first makes sure no
    step of the path is a near-tie that such rounding could flip, so that equal tokens mean equal computations."""
    ours = systems.create(spec("kvbench"), torch.device("cpu"))
    ids = torch.randint(0, ours.config.vocab_size, (2, CTX), generator=torch.Generator().manual_seed(3))
    expected = greedy(ours, ids)
    logits = ours.model(torch.cat([ids, expected[:, :-1]], 1))[:, CTX - 1 :]  # (B, STEPS, vocab), no cache
    assert torch.equal(logits.argmax(-1), expected)
    top2 = logits.topk(2, dim=-1).values  # no near-tie: each system's logits lie within `reorder` of ours
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * reorder(ours.config, logits)
    for name, other_spec in dense_runs():
        other = systems.create(other_spec, torch.device("cpu"))
        assert torch.equal(greedy(other, ids), expected), name
        # a static cache holds ctx + new_tokens slots, as ours; a dynamic one the tokens seen (the last is not in it)
        held = CTX + STEPS if "static" in name else CTX + STEPS - 1
        assert other.cache_bytes() == ours.config.kv_bytes(2, held, 4), name
        torch._dynamo.reset()


@pytest.mark.numeric
@torch.inference_mode()
def test_the_quantized_cache_is_measured_by_its_packed_bytes():
    """quanto's int4 and int2: after the prefill every token is quantized (per group of 64 values: the packed codes,
    a float32 scale and a float32 offset), the decode steps' tokens wait unquantized in the residual. The prefill's
    token is exactly ours: the prompt attends its own K/V before they are quantized."""
    pytest.importorskip("optimum.quanto")
    ours = systems.create(spec("kvbench"), torch.device("cpu"))
    ids = torch.randint(0, ours.config.vocab_size, (2, CTX), generator=torch.Generator().manual_seed(3))
    first = ours.prefill(ids)
    cfg = ours.config
    values = 2 * cfg.n_layer * 2 * cfg.n_query_groups * cfg.head_size  # K and V values per token, both sequences
    for nbits in (4, 2):
        quantized = systems.create(spec("hf_quantized", f"system.nbits={nbits}"), torch.device("cpu"))
        assert torch.equal(quantized.prefill(ids), first)
        assert quantized.cache_bytes() == CTX * values * (nbits / 8 + 2 * 4 / 64)
        quantized.decode(first, CTX)
        assert quantized.cache_bytes() == CTX * values * (nbits / 8 + 2 * 4 / 64) + values * 4


@torch.inference_mode()
def test_each_press_compresses_a_batch_to_the_budget_and_is_reported_with_the_bytes_it_holds():
    """Every press at a budget of 41 of 203 prompt tokens (a ratio no float lands on exactly), batch 2: the prefill
    leaves 41 tokens per sequence and layer, and each decode step adds one. kvpress's Ada-KV masks the tokens it
    evicts instead of freeing them, so its cache holds every token whatever its compression ratio says."""
    pytest.importorskip("kvpress")
    from bench.systems.kvpress import PRESSES

    n = 203
    ids = torch.randint(0, 4000, (2, n), generator=torch.Generator().manual_seed(3))
    kv_bytes = Config.from_name("tiny").kv_bytes
    for press in PRESSES:
        system = systems.create(spec("kvpress", f"press={press}", "cache.budget=41", f"ctx={n}"), torch.device("cpu"))
        token = system.prefill(ids)
        kept = n if press == "adakv" else 41
        assert system.cache_bytes() == kv_bytes(2, kept, 4), press
        system.decode(token, n)
        assert system.cache_bytes() == kv_bytes(2, kept + 1, 4), press


def test_the_ratio_given_to_a_press_keeps_exactly_the_budget():
    """kvpress keeps int(length x (1 - ratio)) tokens; 1 - budget / length would keep one fewer for 18% of the
    (length, budget) pairs below, float rounding taking the product just under the budget."""
    from bench.systems.kvpress import compression_ratio

    pairs = [(length, budget) for length in range(65, 5000, 3) for budget in range(1, length, 7)]
    assert all(int(length * (1 - compression_ratio(budget, length))) == budget for length, budget in pairs)
    assert sum(int(length * (1 - (1 - budget / length))) != budget for length, budget in pairs) > len(pairs) // 10


@pytest.mark.numeric
@torch.inference_mode()
def test_hf_sliding_window_is_kvbench_last_recent_without_sinks():
    """A 32-token window over a 64-token prompt and 11 decode steps: HF's sliding-window layers give the greedy tokens
    of kvbench's last_recent at budget 32 without sinks (both: a query sees the last 32 positions, itself included).
    The memory HF's layer holds is measured, not its view: after a prefill its 31 tokens are a slice of the whole
    prompt's K/V, which stays alive; after a decode step, a slice of the 32 it attended."""
    ours = systems.create(
        spec("kvbench", "cache=last_recent", "cache.budget=32", "cache.sink_tokens=0"), torch.device("cpu")
    )
    sliding = systems.create(spec("hf_sliding", "cache.budget=32"), torch.device("cpu"))
    ids = torch.randint(0, ours.config.vocab_size, (2, CTX), generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy(sliding, ids), greedy(ours, ids))
    token = sliding.prefill(ids)
    assert sliding.cache_bytes() == ours.config.kv_bytes(2, CTX, 4)
    sliding.decode(token, CTX)
    assert sliding.cache_bytes() == ours.config.kv_bytes(2, 32, 4)


def _samples(task: str, questions: int) -> list[tasks.Sample]:
    first = [tasks.build(task, TOK, 2048, 0, i, questions) for i in range(2)]
    width = max(len(s.questions[0]) for s in first)
    return [tasks.build(task, TOK, 2048, 0, i, questions, question_tokens=width) for i in range(2)]


def answer_logits(monkeypatch) -> list[torch.Tensor]:
    """The list every answer's logits are appended to, step by step, by the task protocols (their greedy loop spied
    on, for kvbench and the other systems alike)."""
    seen: list[torch.Tensor] = []
    real = protocols.decode

    def spy(step, logits, start, steps, eos):
        def recorded(token, pos):
            seen.append(step(token, pos))
            return seen[-1]

        seen.append(logits)
        return real(recorded, logits, start, steps, eos)

    monkeypatch.setattr(protocols, "decode", spy)
    return seen


@pytest.mark.numeric
@pytest.mark.parametrize("protocol", ["aware", "agnostic"])
def test_other_systems_answer_the_tasks_as_kvbench_does(protocol, monkeypatch):
    """Two samples of three questions at 2048 tokens: a dense run of HF's caches (and of a press at ratio 0) gives
    the logits kvbench's dense cache gives at every step of every answer, so the questions and answers sit at the
    same positions over the same tokens; under `agnostic` the cache is back to the context after each answer. (Random
    weights answer with one repeated token: the logits, not the texts, tell the positions apart.)"""
    seen = answer_logits(monkeypatch)
    samples = _samples("niah_multiquery", 3)
    ours = systems.create(spec("kvbench"), torch.device("cpu"))
    replies = protocols.run(KvbenchSystem.around(ours.model, TOK), samples, protocol)
    expected, seen[:] = list(seen), []
    assert len(expected) == 3 * samples[0].max_new_tokens  # no answer ended early: every step compared
    for name, other_spec in dense_runs():
        if name not in ("hf_dynamic", "hf_static", "kvpress/knorm"):
            continue
        other = systems.create(other_spec, torch.device("cpu"))
        other.tokenizer = TOK
        assert protocols.run(other, samples, protocol) == replies, name
        assert len(seen) == len(expected), name
        for got, want in zip(seen, expected):  # the same computation, summed in other orders
            assert_within(got, want, reorder(ours.config, want, 2048 + 64))
        seen[:] = []


@pytest.mark.numeric
def test_kvpress_streaming_llm_is_streaming_after_a_full_prefill(monkeypatch):
    """kvpress's streaming_llm keeps 4 sinks and the most recent tokens of a prompt that attended all of itself:
    benchmarks/streaming_prefill.py's after_prefill cache on kvbench (64 slots) gives its logits at every answer step
    under `agnostic`. kvbench's last_recent keeps the same tokens, but each prompt token read only its window: its
    first answer's logits differ."""
    pytest.importorskip("kvpress")
    import importlib.util

    from caches import base

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming_prefill.py"
    module_spec = importlib.util.spec_from_file_location("streaming_prefill", path)
    streaming_prefill = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(streaming_prefill)
    monkeypatch.setitem(base._REGISTRY, "after_prefill", streaming_prefill.RecentAfterPrefill)
    seen = answer_logits(monkeypatch)
    samples = _samples("niah_multiquery", 3)
    ours = systems.create(spec("kvbench"), torch.device("cpu"))
    logits = {}
    for name in ("after_prefill", "last_recent"):
        protocols.run(KvbenchSystem.around(ours.model, TOK, name, 64, sink_tokens=4), samples, "agnostic")
        logits[name], seen[:] = list(seen), []
    press = systems.create(spec("kvpress", "press=streaming_llm", "cache.budget=64"), torch.device("cpu"))
    press.tokenizer = TOK
    protocols.run(press, samples, "agnostic")
    assert len(seen) == len(logits["after_prefill"]) == 3 * samples[0].max_new_tokens
    for got, want in zip(seen, logits["after_prefill"]):  # the same computation, summed in other orders
        assert_within(got, want, reorder(ours.config, want, 2048 + 64))
    assert (seen[0] - logits["last_recent"][0]).abs().max() > reorder(ours.config, seen[0], 2048 + 64)


def test_agnostic_cuts_a_compressed_cache_back_to_the_context(monkeypatch):
    """knorm at 64 of 512 context tokens: each question meets the same 64 tokens per layer, and its own tokens go
    after them."""
    pytest.importorskip("kvpress")
    system = systems.create(spec("kvpress", "press=knorm", "cache.budget=64"), torch.device("cpu"))
    system.tokenizer = TOK
    seen, real = [], system.call

    def spy(ids, start, **kw):
        if ids.shape[1] > 1 and start > 0:  # a question
            seen.append((start, [layer.keys.clone() for layer in system.cache.layers]))
        return real(ids, start, **kw)

    positions = []

    def record(module, args, kwargs):  # RoPE's positions, and the slots the cache writes
        positions.append((kwargs["position_ids"][0].tolist(), kwargs["cache_position"].tolist()))

    monkeypatch.setattr(system, "call", spy)
    system.model.register_forward_pre_hook(record, with_kwargs=True)
    samples = _samples("niah_multiquery", 3)
    protocols.run(system, samples, "agnostic")
    n, q = len(samples[0].context), len(samples[0].questions[0])
    assert len(seen) == 3 and {start for start, _ in seen} == {n}
    for _, keys in seen:
        assert all(k.shape[-2] == 64 for k in keys)
        assert all(torch.equal(a, b) for a, b in zip(keys, seen[0][1]))
    # the first question: at positions n.. for RoPE, in the slots after the 64 kept (so that its mask is causal)
    assert positions[1] == (list(range(n, n + q)), list(range(64, 64 + q)))
    assert positions[2] == ([n + q], [64 + q])  # its answer's first token fed back


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "transformers" else real(name))
    assert systems.missing_extra("hf_static") == "system=hf_static needs transformers: pip install -e '.[hf]'"
    assert systems.missing_extra("kvbench") is None


def test_without_kvpress_a_press_run_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    """kvpress not installed: one line naming the extra that installs it, exit 2, no results folder."""
    import importlib.util

    from bench.run import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "kvpress" else real(name))
    monkeypatch.setattr(sys, "argv", ["bench.run"])
    with pytest.raises(SystemExit) as exit_:
        cli(["system=kvpress", "press=knorm", "cache.budget=0.25", f"results_dir={tmp_path / 'results'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2
    assert lines == ["kvbench: error: system=kvpress needs kvpress: pip install -e '.[peers]'"]
    assert not (tmp_path / "results").exists()


def test_every_system_writes_a_row_of_the_schema(tmp_path):
    """One sweep over every system (in this process): each writes one row holding the schema's columns; on the CPU
    the offloaded cache is `unsupported` with its reason, the others ran."""
    from bench.results.rows import load
    from bench.results.schema import COLUMNS, DESIGN_COLUMNS
    from bench.run import cli

    args = ["model=tiny", "ctx=128", "new_tokens=4", "repeats=1", "warmup=false", "isolate=false", "device=cpu"]
    sweeps = [
        "system=kvbench,hf_dynamic,hf_static,hf_quantized,hf_offloaded",
        "system=hf_sliding cache.budget=0.5",
        "system=kvpress press=knorm,streaming_llm cache.budget=0.25",
    ]
    for sweep in sweeps:
        try:
            cli([*sweep.split(), *args, f"results_dir={tmp_path}", "-m"])
        except SystemExit as done:
            assert done.code in (0, None)
    df = load(tmp_path)
    assert set(DESIGN_COLUMNS) <= set(df.columns) and list(df.columns) == list(COLUMNS)  # nothing undeclared
    by = {(r.system, r.cache): r for r in df.itertuples()}
    assert set(by) == {
        ("kvbench", "dense"),
        ("hf_dynamic", "dense"),
        ("hf_static", "dense"),
        ("hf_quantized", "dense"),
        ("hf_offloaded", "dense"),
        ("hf_sliding", "sliding_window"),
        ("kvpress", "knorm"),
        ("kvpress", "streaming_llm"),
    }
    assert (
        by[("hf_offloaded", "dense")].status == "unsupported" and "device=cuda" in by[("hf_offloaded", "dense")].error
    )
    for key, row in by.items():
        if key[0] != "hf_offloaded":
            assert row.status == "ok", (key, row.error)
            assert row.cache_bytes > 0 and row.decode_ms_p50 > 0 and row.peak_alloc_bytes > row.weights_bytes, key
    kv_bytes = Config.from_name("tiny").kv_bytes
    knorm = by[("kvpress", "knorm")]  # 32 tokens kept by the prefill; each of the 4 decode steps adds one
    assert (knorm.cache_bytes_prefill, knorm.cache_bytes) == (kv_bytes(1, 32, 4), kv_bytes(1, 32 + 4, 4))
    assert json.loads(knorm.system_kwargs) == {"press": "knorm"}
    assert json.loads(by[("hf_quantized", "dense")].system_kwargs)["nbits"] == 4


def test_no_code_outside_a_system_s_module_tests_its_name():
    """The harness, the spec, the report and the plots ask a system's class: its name is a literal in its own module
    only (bench/systems/<module>.py), and in no other module of bench/."""
    root = Path(__file__).resolve().parents[1] / "bench"
    for name, cls in systems.system_classes().items():
        own = Path(sys.modules[cls.__module__].__file__).resolve()
        for path in root.rglob("*.py"):
            if path.resolve() != own:
                text = path.read_text()
                assert f'"{name}"' not in text and f"'{name}'" not in text, (name, str(path))


@pytest.mark.numeric
def test_a_press_loaded_from_a_recorded_prompt_keeps_what_its_own_prefill_keeps():
    """One uncompressed prefill of a 200-token batch, each layer's input kept, then every press that can share it
    compressing those inputs (`load`): per layer the keys and values its own prefill (the press's hook) keeps, and
    the same logits after three decode steps. The context's first 150 tokens (agnostic's, inside aware's prompt)
    load as a prefill of them alone does, within the float32 bound of the sums."""
    pytest.importorskip("kvpress")
    from bench.systems.kvpress import PRESSES, KvpressSystem

    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (2, 200))  # (B, T)
    shared = [p for p in PRESSES if KvpressSystem.shares_config({"press": p})]
    assert set(shared) == {"knorm", "streaming_llm", "tova", "snapkv", "expected_attention"}
    job = spec("kvpress", "press=knorm", "cache.budget=48", "ctx=200")
    system = systems.create(job, torch.device("cpu"))
    last, prompts = system.record(ids)
    head = system.record(ids[:, :150])[1]

    def state(steps: int = 3) -> tuple[list, list]:
        logits, kept = [], [(layer.keys.clone(), layer.values.clone()) for layer in system.cache.layers]
        token = system.call(ids[:, -1:], 200).argmax(-1, keepdim=True)
        for i in range(steps):
            logits.append(system.call(token, 201 + i))
            token = logits[-1].argmax(-1, keepdim=True)
        return kept, logits

    for press in shared:
        system.use_cache(job.cache, {"press": press})
        system.open(2, 204)
        own_last = system.forward(ids, 0)
        own = state()
        system.load(prompts)
        loaded = state()
        assert torch.equal(own_last, last) and own[0][0][0].shape[2] == 48, press
        for (k1, v1), (k2, v2) in zip(own[0], loaded[0]):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), press
        for a, b in zip(own[1], loaded[1]):
            assert torch.equal(a, b), press
        system.load([p.prefix(150) for p in prompts])
        from_prefix = [(layer.keys.clone(), layer.values.clone()) for layer in system.cache.layers]
        system.load(head)
        for (k1, v1), layer in zip(from_prefix, system.cache.layers):
            assert k1.shape == layer.keys.shape, press
            tolerance = bound(layer.keys, model_terms(system.config, 150))
            assert_within(k1, layer.keys, tolerance, press)
            assert_within(v1, layer.values, bound(layer.values, model_terms(system.config, 150)), press)
