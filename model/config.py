"""One flat config for every decoder we run, and the one mapping from a HF config.json.

Two architectures: Llama (RMSNorm, RoPE, SwiGLU, GQA) and OPT (LayerNorm, learned positions,
ReLU MLP, pre- or post-LN). The Llama-shaped families read through the Llama mapping, each
difference one field: Mistral (a sliding attention window), Qwen2 and Qwen2.5 (biases on the
query, key and value projections; a window on some layers when enabled), Qwen3 (RMSNorm on each
head's queries and keys before RoPE). Any field value that would change the computation in a way
this decoder does not implement raises UnsupportedConfig.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .jsonfile import read_json


class UnsupportedConfig(ValueError):
    pass


@dataclass
class Config:
    arch: str  # "llama" | "opt"
    vocab_size: int
    dim: int  # hidden_size: width of the residual stream
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int
    ffn_dim: int
    max_seq_len: int  # max_position_embeddings
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_affine: bool = True  # LayerNorm weight and bias present
    pre_norm: bool = True  # False: OPT-350m style post-LN blocks
    final_norm: bool = True  # norm before the LM head
    act: str = "silu"  # "silu" | "relu"
    gated_mlp: bool = True  # SwiGLU: down(act(gate(x)) * up(x)); else fc2(act(fc1(x)))
    attn_bias: bool = False  # bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every head's q and k, before RoPE
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    pos: str = "rope"  # "rope" | "learned"
    pos_offset: int = 0  # OPT learned positions start at row 2
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    sliding_window: int | None = None  # a query at position p sees keys at positions > p - window ...
    sliding_layers: list[int] = field(default_factory=list)  # ... in these layers (Mistral: all)
    embed_dim: int = 0  # OPT word_embed_proj_dim; != dim adds project_in/out. 0 means dim
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.embed_dim == 0:
            self.embed_dim = self.dim
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedConfig(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


def layer_window(cfg: Config, layer):
    """The sliding window of one layer, or None (full attention)."""
    return cfg.sliding_window if layer in cfg.sliding_layers else None


def _unsupported(field_name, value, allowed):
    raise UnsupportedConfig(
        f"unsupported config value {field_name}={value!r} (this decoder implements {allowed})")


def _eos_list(v):
    return [] if v is None else ([v] if isinstance(v, int) else list(v))


# what transformers assumes for a key a config.json leaves out, where it differs from Llama's default
FAMILY_DEFAULTS = {
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 131072,
                "bos_token_id": 1, "eos_token_id": 2}}


def _sliding(c: dict, kind: str):
    """(window, the layers it applies to) as transformers reads them for this model_type."""
    n = c["num_hidden_layers"]
    if kind == "mistral":  # every layer, when a window is set (transformers ignores Mistral's layer_types)
        window = c.get("sliding_window")
        return window, list(range(n)) if window is not None else []
    if kind in ("qwen2", "qwen3"):  # the window only when enabled; by default the layers from max_window_layers
        window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else None
        types = c.get("layer_types") or ["sliding_attention" if window is not None and i >= c.get(
            "max_window_layers", 28) else "full_attention" for i in range(n)]
        if not isinstance(types, list) or len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            _unsupported("layer_types", types, f"{n} of 'full_attention' and 'sliding_attention'")
        if window is None and "sliding_attention" in types:  # transformers cannot build that mask either
            _unsupported("layer_types", types, "'sliding_attention' only with use_sliding_window and a sliding_window")
        return window, [i for i, t in enumerate(types) if t == "sliding_attention" and window is not None]
    return None, []


def _llama(c: dict, kind: str = "llama") -> Config:
    c = {**FAMILY_DEFAULTS.get(kind, {}), **c}
    if c.get("hidden_act", "silu") != "silu":
        _unsupported("hidden_act", c["hidden_act"], "'silu'")
    if c.get("pretraining_tp", 1) != 1:
        _unsupported("pretraining_tp", c["pretraining_tp"], "1")
    # transformers < 5 writes rope_scaling (+ rope_theta); >= 5 writes rope_parameters.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        _unsupported("rope_scaling.rope_type", rope_type, "'default', 'linear', 'llama3'")
    n_heads = c["num_attention_heads"]
    window, sliding = _sliding(c, kind)
    # fixed by the family, not read: Qwen2's q/k/v projections always carry a bias and its output
    # projection never does; Mistral's never do
    qkv_bias = {"qwen2": True, "mistral": False}.get(kind, c.get("attention_bias", False))
    out_bias = {"qwen2": False, "mistral": False}.get(kind, c.get("attention_bias", False))
    return Config(
        arch="llama",
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=c.get("rms_norm_eps", 1e-6),
        act="silu",
        gated_mlp=True,
        attn_bias=qkv_bias,
        out_bias=out_bias,
        qk_norm=kind == "qwen3",
        mlp_bias=False if kind in ("qwen2", "qwen3", "mistral") else c.get("mlp_bias", False),
        pos="rope",
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
        rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_len=rope.get("original_max_position_embeddings", 8192),
        sliding_window=window,
        sliding_layers=sliding,
        tie_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=_eos_list(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _opt(c: dict) -> Config:
    if c.get("activation_function", "relu") != "relu":
        _unsupported("activation_function", c["activation_function"], "'relu'")
    if c.get("_remove_final_layer_norm", False):
        _unsupported("_remove_final_layer_norm", True, "False")
    pre = c.get("do_layer_norm_before", True)
    bias = c.get("enable_bias", True)
    dim, n_heads = c["hidden_size"], c["num_attention_heads"]
    return Config(
        arch="opt",
        vocab_size=c["vocab_size"],
        dim=dim,
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        ffn_dim=c["ffn_dim"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=1e-5,  # OPT uses nn.LayerNorm's default
        norm_affine=c.get("layer_norm_elementwise_affine", True),
        pre_norm=pre,
        final_norm=pre,  # post-LN OPT (350m) has no final_layer_norm
        act="relu",
        gated_mlp=False,
        attn_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        pos="learned",
        pos_offset=2,
        embed_dim=c.get("word_embed_proj_dim") or dim,
        tie_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=_eos_list(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


class ConfigError(UnsupportedConfig):
    pass


POSITIVE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len",
            "rope_original_max_len", "embed_dim")
# Absolute caps, where no weights are at hand to bound a size (load_model also checks the
# parameter count against the weights present): far above any released model (Llama 3.1 405B
# has 126 layers, d 16384, ffn 53248, 128 heads of 128; Gemma's vocabulary is 256000; contexts
# reach 10M), and low enough that nothing a config describes is built or allocated for long.
LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 16, "embed_dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10,
          "n_kv_heads": 1 << 10, "head_dim": 1 << 12, "ffn_dim": 1 << 18, "max_seq_len": 1 << 24,
          "rope_original_max_len": 1 << 24}
MAX_PARAMS = 1 << 41  # about 2.2 trillion
MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few kB
FLAGS = ("norm_affine", "pre_norm", "final_norm", "attn_bias", "out_bias", "qk_norm", "mlp_bias", "tie_embeddings")
LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")  # model_types read by the Llama mapping


def is_int(v):
    """An integer, not a boolean (True would pass as 1): the project's one test of an integer value."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v):
    """A finite number, not a boolean: the project's one test of a real value (NaN fails it)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(cfg: Config) -> Config:
    """Types and ranges of every value, so that a bad config.json fails here, naming the field,
    rather than as a TypeError deep in the model or a model that runs wrongly."""
    def bad(name, why):
        raise ConfigError(f"config value {name}={getattr(cfg, name)!r} {why}")
    for name in POSITIVE:
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            bad(name, "must be a positive integer")
        if getattr(cfg, name) > LIMITS[name]:
            bad(name, f"is above this project's limit {LIMITS[name]} (far above any released model)")
    for name in FLAGS:
        if not isinstance(getattr(cfg, name), bool):
            bad(name, "must be true or false")
    if not is_real(cfg.norm_eps) or not 0 < cfg.norm_eps < 1:
        bad("norm_eps", "must be a number in (0, 1)")
    for name in ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        if not is_real(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            bad(name, "must be a positive number")
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        if v is not None and (not is_int(v) or not 0 <= v < cfg.vocab_size):
            bad(name, f"must be null or a token id in [0, {cfg.vocab_size})")
    if not all(is_int(t) and 0 <= t < cfg.vocab_size for t in cfg.eos_token_id):
        bad("eos_token_id", f"must be token ids in [0, {cfg.vocab_size})")
    if cfg.sliding_window is not None and (not is_int(cfg.sliding_window) or cfg.sliding_window <= 0):
        bad("sliding_window", "must be null or a positive integer")
    layers = cfg.sliding_layers
    if not (isinstance(layers, list) and all(is_int(i) and 0 <= i < cfg.n_layers for i in layers)
            and (cfg.sliding_window is not None or not layers)):
        bad("sliding_layers", f"must be layer indices in [0, {cfg.n_layers}), and only with a sliding_window")
    if n_params(cfg) > MAX_PARAMS:
        raise ConfigError(f"config describes {n_params(cfg):,} parameters, above this project's limit "
                          f"{MAX_PARAMS:,} (far above any released model)")
    return cfg


def n_params(cfg: Config) -> int:
    """The parameter count of Decoder(cfg), by arithmetic: what a config implies, known before
    anything is built (tests/test_bounds.py checks it against the built model)."""
    d, e, hd, f = cfg.dim, cfg.embed_dim, cfg.head_dim, cfg.ffn_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    norm = (d if cfg.norm_affine else 0) * (2 if cfg.norm == "layer" and cfg.norm_affine else 1)
    attn = 2 * d * q + 2 * d * kv + (q + 2 * kv if cfg.attn_bias else 0) + (d if cfg.out_bias else 0) \
        + (2 * hd if cfg.qk_norm and cfg.norm_affine else 0)
    mats = 3 if cfg.gated_mlp else 2
    mlp = mats * d * f + ((mats - 1) * f + d if cfg.mlp_bias else 0)
    block = 2 * norm + attn + mlp
    edges = cfg.vocab_size * e * (1 if cfg.tie_embeddings else 2) + (2 * e * d if e != d else 0) \
        + ((cfg.max_seq_len + cfg.pos_offset) * d if cfg.pos == "learned" else 0) + (norm if cfg.final_norm else 0)
    return cfg.n_layers * block + edges


def from_hf(c: dict) -> Config:
    if not isinstance(c, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(c).__name__}")
    kind = c.get("model_type")
    if kind not in (*LLAMA_SHAPED, "opt"):
        _unsupported("model_type", kind, ", ".join(f"'{k}'" for k in (*LLAMA_SHAPED, "opt")))
    try:
        return check(_opt(c) if kind == "opt" else _llama(c, kind))
    except KeyError as e:
        raise ConfigError(f"config has no {e.args[0]!r}, which a {kind} model needs") from None
    except TypeError as e:  # a value of the wrong type inside the mapping, e.g. a string where a number goes
        raise ConfigError(f"config has a value of the wrong type: {e}") from None


def load_config(path: str | Path) -> Config:
    """The config.json at path (a file or its folder), checked (check): every size at most its
    LIMITS entry (layers 1024, hidden and embedding width 65536, heads 1024, head_dim 4096, ffn
    262144, vocabulary 4194304, positions 16777216), MAX_PARAMS parameters in all, and the file
    at most MAX_CONFIG_BYTES; load_model also bounds the parameter count by the weights present."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        d = read_json(file, "config", MAX_CONFIG_BYTES)  # a config.json is at most MAX_CONFIG_BYTES
    except FileNotFoundError:
        raise ConfigError(f"no config at {file}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return from_hf(d)
