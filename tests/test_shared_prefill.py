"""One prefill, many caches (caches/prompt.py, bench/eval/protocols.py SharedPrompts, bench/eval/quality.py): a prompt
recorded once and loaded into a cache leaves it exactly as its own prefill of the prompt does, for every cache that
says it can be loaded; a sweep answering many configurations in one pass writes the records each job would have
written alone."""

import pytest
import torch
from bounds import assert_within, attention_terms, bound, model_terms

from bench.eval import protocols
from bench.systems.kvbench import KvbenchSystem
from caches import cache_class, cache_names
from caches.prompt import PromptRecorder

SHARED = [name for name in cache_names() if cache_class(name).shares_prefill]
VARIANTS = [(name, {}) for name in SHARED] + [("adakv", {"scorer": "h2o"}), ("h2o", {"buffer": "int8"})]
NAMES = [name + "".join(f"-{v}" for v in knobs.values()) for name, knobs in VARIANTS]


def test_every_score_based_cache_and_dense_can_be_loaded():
    assert {"dense", "h2o", "qh2o", "tova", "snapkv", "pyramidkv", "knorm", "keydiff", "random"} <= set(SHARED)
    assert {"expected_attention", "adakv"} <= set(SHARED)
    assert "last_recent" not in SHARED  # its window changes the prompt's own attention: it runs its own


@torch.inference_mode()
def _run(system, ids: torch.Tensor, shared: protocols.SharedPrompts | None, context: int | None = None) -> tuple:
    """Fresh caches, the prompt (own prefill, or loaded; its first `context` tokens the context), then three decode
    steps: (kept positions per layer, the logits after the prompt and after each step)."""
    B, T = ids.shape
    system.open(B, T + 4)
    logits = [shared.start(system, ids, context=context) if shared else system.forward(ids, 0)]
    kept = [c.token_positions().clone() for c in system.model.kv_caches]
    for i in range(3):
        logits.append(system.forward(logits[-1].argmax(-1, keepdim=True), T + i))
    return kept, logits


@pytest.mark.numeric
@pytest.mark.parametrize("name, knobs", VARIANTS, ids=NAMES)
def test_a_loaded_cache_keeps_and_answers_what_its_own_prefill_does(tiny, name, knobs):
    """Budget 48 of a 160-token prompt (batch 2), prefill chunk >= the prompt: the kept positions of every layer and
    the logits after the prompt and after three decode steps are its own prefill's, the recording made while
    another cache (dense) was open."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 160))  # (B, T)
    system = KvbenchSystem.around(tiny, None, name, 48, 256, **knobs)
    own_kept, own_logits = _run(system, ids, None)
    shared = protocols.SharedPrompts()
    dense = KvbenchSystem.around(tiny, None, "dense", 0, 256)
    _run(dense, ids, shared)  # records the prompt
    loaded_kept, loaded_logits = _run(system, ids, shared)  # loads it
    assert shared.paths == {"shared"} and len(shared.recorded) == 1
    for layer, (a, b) in enumerate(zip(own_kept, loaded_kept)):
        assert torch.equal(a, b), f"layer {layer} keeps other positions"
    for a, b in zip(own_logits, loaded_logits):
        assert_within(b, a, bound(a, model_terms(tiny.config, 164)), "logits")


def test_a_cache_whose_prefill_differs_runs_its_own(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 100))
    shared = protocols.SharedPrompts()
    _run(KvbenchSystem.around(tiny, None, "last_recent", 32, 256), ids, shared)
    _run(KvbenchSystem.around(tiny, None, "h2o", 32, 64), ids, shared)  # a prompt in two calls
    assert shared.paths == {"own"} and not shared.recorded


@pytest.mark.numeric
def test_a_window_cache_resumes_its_own_prefill_past_what_a_recording_holds(tiny, monkeypatch):
    """last_recent keeping 32 tokens, a 100-token context and a 20-token question (batch 2): each of the first 32
    positions of its own prefill sees every position before it, so they are loaded from the recording of context and
    question that another cache made, and only the context's other 68 are prefilled. The kept positions, and the
    logits after the question and after three decode steps, are those of its whole own prefill; with the recording's
    keys perturbed they are not."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 120))  # (B, T)
    system = KvbenchSystem.around(tiny, None, "last_recent", 32, 256)
    alone = protocols.SharedPrompts()
    own_kept, own_logits = _run(system, ids, alone, context=100)

    def resumed(recording_hook=None) -> tuple:
        shared = protocols.SharedPrompts()
        if recording_hook:
            monkeypatch.setattr(PromptRecorder, "_prefill", recording_hook)
        _run(KvbenchSystem.around(tiny, None, "dense", 0, 256), ids, shared)  # records context and question
        monkeypatch.undo()
        shared.paths = set()  # which prefills the cache under test ran (the dense one's recording was "shared")
        calls = []
        real = system.forward
        monkeypatch.setattr(system, "forward", lambda x, pos: calls.append((x.shape[1], pos)) or real(x, pos))
        kept, logits = _run(system, ids, shared, context=100)
        monkeypatch.undo()
        assert shared.paths == {"resumed"} and calls[:2] == [(68, 32), (20, 100)]  # the context past 32, the question
        return kept, logits

    kept, logits = resumed()
    assert alone.paths == {"own"}
    for layer, (a, b) in enumerate(zip(own_kept, kept)):
        assert torch.equal(a, b), f"layer {layer} keeps other positions"
    for a, b in zip(own_logits, logits):
        assert_within(b, a, bound(a, model_terms(tiny.config, 124)), "logits")
    real = PromptRecorder._prefill

    def perturbed(self, query, key, value):
        out = real(self, query, key, value)
        self.prompt.key = key.flip(2)  # the keys in reverse order
        return out

    _, broken = resumed(perturbed)
    assert float((broken[0] - own_logits[0]).abs().max()) > bound(own_logits[0], model_terms(tiny.config, 124))


def test_a_broken_load_is_caught(tiny, monkeypatch):
    """The comparison above fails when loading keeps something else: here the recorded keys are perturbed."""
    real = PromptRecorder._prefill

    def perturbed(self, query, key, value):
        out = real(self, query, key, value)
        self.prompt.key = key.flip(2)  # the keys in reverse order
        return out

    ids = torch.randint(0, tiny.config.vocab_size, (1, 120))
    system = KvbenchSystem.around(tiny, None, "knorm", 40, 256)
    own_kept, _ = _run(system, ids, None)
    monkeypatch.setattr(PromptRecorder, "_prefill", perturbed)
    loaded_kept, _ = _run(system, ids, protocols.SharedPrompts())
    assert not all(torch.equal(a, b) for a, b in zip(own_kept, loaded_kept))


@pytest.mark.numeric
def test_the_first_tokens_of_a_recording_are_the_recording_of_those_tokens(tiny):
    """The first 120 positions of a 160-token recording (agnostic's context inside aware's prompt) hold the queries,
    keys and values a recording of those 120 tokens holds, and give the weights its policies see: every query's
    (h2o's, taken from the whole prompt's less its last 40 rows) and the last 32's (snapkv's window)."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 160))  # (B, T)
    system = KvbenchSystem.around(tiny, None, "dense", 0, 256)
    system.open(2, 164)
    whole = system.record(ids)[1]
    alone = system.record(ids[:, :120])[1]
    opts = system.model.kv_caches[0].attn_opts
    c = tiny.config
    for layer, (w, a) in enumerate(zip(whole, alone)):
        w.weights(0, opts)  # the whole prompt's first: the prefix takes them from it
        part = w.prefix(120)
        terms = model_terms(c, 120) * (layer + 1) // c.n_layer  # the sums up to this layer
        for got, expected in [(part.query, a.query), (part.key, a.key), (part.value, a.value)]:
            assert_within(got, expected, bound(expected, terms), f"layer {layer} q/k/v")
        for w_from in (0, 120 - 32):
            expected = a.weights(w_from, opts)  # (B, G, 120): sums of up to 120 x n_head // G weights, each <= 1
            tolerance = bound(expected, terms + attention_terms(c.head_size, 120) + 120 * c.n_head)
            assert_within(part.weights(w_from, opts), expected, tolerance, f"layer {layer} weights from {w_from}")


@pytest.mark.numeric
@pytest.mark.parametrize("name", ["dense", "snapkv"])
def test_a_hybrid_s_window_layers_load_the_recording_too(name):
    """A hybrid (windowed layers of 8 tokens around global ones): its windowed layers' window caches load the
    recording as the cache under test does in the global layers, each keeping what its own prefill keeps and the
    logits its own prefill gives."""
    from model.config import Config
    from model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny", n_layer=4, layer_windows=(8, None, 8, None), rope_local_base=1000.0)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))  # (B, T): longer than the windows and the budget
    system = KvbenchSystem.around(model, None, name, 16, 64)
    own_kept, own_logits = _run(system, ids, None)
    shared = protocols.SharedPrompts()
    _run(KvbenchSystem.around(model, None, "dense", 0, 64), ids, shared)
    loaded_kept, loaded_logits = _run(system, ids, shared)
    assert shared.paths == {"shared"}
    for layer, (a, b) in enumerate(zip(own_kept, loaded_kept)):
        assert torch.equal(a, b), f"layer {layer} keeps other positions"
    for a, b in zip(own_logits, loaded_logits):
        assert_within(b, a, bound(a, model_terms(model.config, 44)), "logits")
