import pytest
import torch

from model.config import CONFIGS, Config
from model.gpt import GPT


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*tiny.*smollm2-135m.*llama-3.2-1b"):
        Config.from_name("gpt-9")


def test_overrides():
    c = Config.from_name("tiny", n_layer=3)
    assert c.n_layer == 3 and Config.from_name("tiny").n_layer == 2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_n_params_matches_module(name):
    with torch.device("meta"):
        model = GPT.from_name(name)
    assert sum(p.numel() for p in model.parameters()) == CONFIGS[name].n_params


def test_known_sizes():
    # Published parameter counts (tied embeddings counted once).
    assert CONFIGS["llama-3.2-1b"].n_params == 1_235_814_400
    assert CONFIGS["smollm2-135m"].n_params == 134_515_008
    assert CONFIGS["tiny"].n_params < 5_000_000


def test_kv_bytes_is_analytic():
    c = CONFIGS["llama-3.2-1b"]
    # 16 layers * 2 (K, V) * 8 KV heads * 64 * 2 bytes = 32 KiB per token; ctx 32k, batch 4 -> 4 GiB.
    assert c.kv_bytes(batch=4, tokens=32768, itemsize=2) == 4 * 2**30
