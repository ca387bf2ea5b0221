"""Other libraries' caches as systems of the harness (bench/systems): on the same weights, every system's greedy
tokens are kvbench's."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench import systems
from bench.run import CONF_DIR
from bench.spec import resolve

pytest.importorskip("transformers")
CTX, STEPS = 64, 12


def spec(system: str):
    overrides = [f"system={system}", "model=tiny", f"ctx={CTX}", f"new_tokens={STEPS}", "batch=2", "device=cpu"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return resolve(compose(config_name="config", overrides=overrides))


@torch.inference_mode()
def greedy(system, ids: torch.Tensor) -> torch.Tensor:
    tokens = [system.prefill(ids)]
    for i in range(STEPS - 1):
        tokens.append(system.decode(tokens[-1], CTX + i))
    return torch.cat(tokens, 1)  # (B, STEPS)


@torch.inference_mode()
def test_every_system_gives_kvbench_greedy_tokens():
    """Two sequences, a prefill of 64 tokens and 11 decode steps per system (HF's compiled StaticCache compiled as
    `generate` compiles it). Implementations round differently (about 1e-6 here); the check first makes sure no step
    of the path is a near-tie that such rounding could flip, so that equal tokens mean equal computations."""
    ours = systems.create(spec("kvbench"), torch.device("cpu"))
    ids = torch.randint(0, ours.config.vocab_size, (2, CTX), generator=torch.Generator().manual_seed(3))
    expected = greedy(ours, ids)
    logits = ours.model(torch.cat([ids, expected[:, :-1]], 1))[:, CTX - 1 :]  # (B, STEPS, vocab), no cache
    assert torch.equal(logits.argmax(-1), expected)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    for name in systems.SYSTEMS[1:]:
        other = systems.create(spec(name), torch.device("cpu"))
        assert torch.equal(greedy(other, ids), expected), name
        # a static cache holds ctx + new_tokens slots, as ours; a dynamic one the tokens seen (the last is not in it)
        held = CTX + STEPS if "static" in name else CTX + STEPS - 1
        assert other.cache_bytes() == ours.config.kv_bytes(2, held, 4), name
        torch._dynamo.reset()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "transformers" else real(name))
    assert systems.missing_extra("hf_static") == "system=hf_static needs transformers: pip install -e '.[hf]'"
    assert systems.missing_extra("kvbench") is None
