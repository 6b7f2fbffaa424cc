"""Llama-2-style decoder (pre-RMSNorm, RoPE, SDPA multi-head attention, SwiGLU) with a documented config.

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``, ``lm_head``, ...), so an export is a plain prefix mapping. Every projection is a
plain ``nn.Linear`` reached by attribute, so a converter can swap it by module name for a quantized subclass;
nothing here knows about quantization. See docs/training.md §1. ``KVCache`` holds past keys and values so that
generation feeds one new token per step instead of the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .quant_linear import shared_input_projections


@dataclass
class LlamaConfig:
    """Shape and initialisation of a Llama-style model; validated on construction."""

    n_layer: int  # number of transformer blocks
    d_model: int  # residual stream width
    n_head: int  # attention heads (multi-head: as many key/value heads as query heads)
    vocab_size: int = 32000  # token ids in [0, vocab_size); set by the data pipeline's tokenizer
    max_seq_len: int = 512  # longest sequence accepted; length of the RoPE tables
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init; residual output projections get init_std/sqrt(2*n_layer)
    mlp_hidden: int | None = None  # SwiGLU hidden width; None derives it from d_model (see `hidden`)
    mlp_multiple_of: int = 256  # derived MLP hidden width is rounded up to a multiple of this

    def __post_init__(self) -> None:
        positive_ints = ["n_layer", "d_model", "n_head", "vocab_size", "max_seq_len", "mlp_multiple_of"]
        if self.mlp_hidden is not None:
            positive_ints.append("mlp_hidden")
        for name in positive_ints:
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is a config mistake, not a 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}; "
                f"allowed n_head values divide d_model"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LlamaConfig.head_dim = d_model // n_head = {self.head_dim} must be even (RoPE rotates pairs); "
                f"got d_model={self.d_model}, n_head={self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model // n_head."""
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width: mlp_hidden if set, else mlp_multiple_of * ceil(int(8 * d_model / 3) / multiple)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        # Integer arithmetic: (8*d)//3 == int(8*d/3) for positive d, and -(-a // m) == ceil(a / m).
        base = (8 * self.d_model) // 3
        return self.mlp_multiple_of * -(-base // self.mlp_multiple_of)

    @property
    def params_non_embedding(self) -> int:
        """N: block weights and norms plus the final norm (docs/training.md §1), excluding embeddings and lm_head."""
        d = self.d_model
        per_layer = 4 * d * d + 3 * d * self.hidden + 2 * d
        return self.n_layer * per_layer + d

    @property
    def params_embedding(self) -> int:
        """Input embedding plus the untied lm_head: 2 * vocab_size * d_model."""
        return 2 * self.vocab_size * self.d_model

    @property
    def params_total(self) -> int:
        """All parameters: params_non_embedding + params_embedding."""
        return self.params_non_embedding + self.params_embedding

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, nanoGPT/PaLM convention.

        6 * (N + vocab_size * d_model) for the matmuls (the lm_head matmul counts; the embedding lookup does
        not) plus 12 * n_layer * d_model * seq_len for attention scores and values. seq_len defaults to
        max_seq_len.
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        matmul_params = self.params_non_embedding + self.vocab_size * self.d_model
        return 6 * matmul_params + 12 * self.n_layer * self.d_model * seq_len

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON/YAML-serialisable); derived quantities are not included."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Build from a dict of fields; unknown keys raise ValueError naming them and the allowed fields."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"LlamaConfig: unknown keys {unknown}; allowed fields are {allowed}")
        return cls(**d)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos and sin tables, each float32 of shape [max_seq_len, head_dim].

    Hugging Face "rotate_half" layout: dimension k and k + head_dim/2 form a pair rotated by the angle
    position * theta^(-2k/head_dim), so both halves of a row repeat the same head_dim/2 angles.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # [max_seq_len, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_seq_len, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dimension (halves of head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by tables cos, sin [T, head_dim]; returns x's dtype.

    Computed in float32 because RoPE stays high precision (docs/training.md §2) even when x is bf16 under autocast.
    """
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, last dim) + eps) * weight, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class KVCache:
    """Keys and values of the positions a model has already seen, for incremental decoding.

    Per layer, keys and values are preallocated as ``[B, n_head, max_len, head_dim]`` on the first write (with
    the batch size, dtype and device of that write, so a cache follows autocast and the model's device); the
    first ``length`` positions are filled. Pass the same cache to successive ``LlamaModel.forward`` calls: a
    call with ``T`` new tokens reads positions ``[0, length)``, writes ``[length, length + T)`` and then advances
    ``length`` by ``T``. Build one with ``LlamaModel.make_cache``; ``reset()`` empties it for reuse.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        for name, value in (("n_layer", n_layer), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache.{name} must be a positive int, got {value!r}")
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def reset(self) -> None:
        """Forget every cached position (the buffers are kept and overwritten by the next calls)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, H, T, head_dim]`` of layer ``layer`` at positions ``[length, length + T)``.

        Returns views of all keys and values of that layer so far, ``[B, H, length + T, head_dim]``. Does not
        advance ``length``: the model calls ``advance(T)`` once every layer has been written.
        """
        batch, heads, seq, head_dim = k.shape
        end = self.length + seq
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.length} positions; {seq} more would exceed its max_len="
                             f"{self.max_len}")
        if self.keys[layer] is None:
            shape = (batch, heads, self.max_len, head_dim)
            self.keys[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        if (batch, heads, head_dim) != (keys.shape[0], keys.shape[1], keys.shape[3]):
            raise ValueError(f"KVCache layer {layer} holds batch={keys.shape[0]}, heads={keys.shape[1]}, "
                             f"head_dim={keys.shape[3]}; got keys of shape {tuple(k.shape)}: use a new cache")
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, seq: int) -> None:
        """Mark ``seq`` more positions as filled (after every layer's ``update`` for them)."""
        self.length += seq


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with RoPE on queries and keys; [B, T, d] -> [B, T, d]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x [B, T, d]; cos, sin [T, head_dim] for the T new positions. With ``cache``, the new keys and values
        are written into slot ``layer`` and the queries attend to every cached position plus the causal part
        of the new chunk."""
        batch, seq, d = x.shape
        # [B, T, d] -> [B, H, T, head_dim]
        # One quantization of x for the three projections (when the layers are quantized and allow it).
        q, k, v = (y.reshape(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
                   for y in shared_input_projections(x, [self.q_proj, self.k_proj, self.v_proj]))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None or cache.length == 0:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, head_dim]
        else:
            past = cache.length
            k, v = cache.update(layer, k, v)  # [B, H, past + T, head_dim]
            mask = None
            if seq > 1:
                # is_causal would align the triangle to the top-left (query i sees keys <= i), ignoring the
                # cached prefix; new query i sits at position past + i and sees keys [0, past + i].
                key_positions = torch.arange(past + seq, device=x.device)
                query_positions = torch.arange(past, past + seq, device=x.device)
                mask = key_positions[None, :] <= query_positions[:, None]  # [T, past + T] bool, True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(batch, seq, d)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); [B, T, d] -> [B, T, d]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.hidden, bias=False)
        self.down_proj = nn.Linear(config.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_projections(x, [self.gate_proj, self.up_proj])
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); [B, T, d] -> [B, T, d]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder-only language model: token ids [B, T] -> logits [B, T, vocab_size].

    Build on the meta device and materialise with::

        with torch.device("meta"):
            model = LlamaModel(config)
        model.to_empty(device="cpu")
        model.init_weights()
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Non-persistent: derived from the config, so they stay out of checkpoints and the HF export.
        # Filled by init_weights(), which also runs after to_empty() on a meta-built model.
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter and the RoPE buffers in place.

        Embeddings, lm_head and every nn.Linear (including subclasses): N(0, init_std); the residual output
        projections o_proj and down_proj: N(0, init_std / sqrt(2 * n_layer)); RMSNorm weights: 1. Parameters
        are drawn in module order, so the same generator seed gives the same weights wherever the model was
        built. generator=None uses the global torch RNG.
        """
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                std = residual_std if is_residual_out else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count from the module's parameters; non_embedding excludes embed_tokens and lm_head."""
        excluded = {id(self.embed_tokens.weight), id(self.lm_head.weight)} if non_embedding else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)

    def make_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this model holding up to ``max_len`` positions (default and limit: max_seq_len)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= self.config.max_seq_len:
            raise ValueError(f"make_cache: max_len={max_len!r} must be an int in [1, max_seq_len="
                             f"{self.config.max_seq_len}]")
        return KVCache(self.config.n_layer, max_len)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids: int64 [B, T] with T <= max_seq_len; targets: int64 [B, T] or None (-100 = ignored).

        Returns logits [B, T, vocab_size] (float32 unless computed under autocast) if targets is None, else
        (logits, loss) with loss the float32 scalar mean cross-entropy over non-ignored targets.

        cache: None (the whole sequence is given) or a KVCache from ``make_cache`` holding ``P = cache.length``
        earlier positions of the same sequences: input_ids are then positions [P, P + T) (RoPE is offset by
        P), they attend to the cached ones, and the cache grows by T. P + T must not exceed max_seq_len nor the
        cache's max_len. Logits equal those of the full-sequence forward at the same positions up to float
        rounding (the matmuls see other shapes); with quantized activations such a rounding difference can move a
        value across a rounding boundary of the grid, as it can between any two batch shapes.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        start = 0
        if cache is not None:
            if not isinstance(cache, KVCache) or cache.n_layer != self.config.n_layer:
                raise ValueError(f"cache must be a KVCache for {self.config.n_layer} layers (from make_cache), "
                                 f"got {cache!r}")
            start = cache.length
            limit = min(cache.max_len, self.config.max_seq_len)
            if start + seq > limit:
                raise ValueError(f"cache holds {start} positions and {seq} new tokens would make {start + seq}, "
                                 f"beyond the limit {limit} (max_seq_len={self.config.max_seq_len}, cache "
                                 f"max_len={cache.max_len})")
        elif seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
        x = self.embed_tokens(input_ids)  # [B, T, d]
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, index)
        if cache is not None:
            cache.advance(seq)
        logits = self.lm_head(self.norm(x))  # [B, T, vocab]
        if targets is None:
            return logits
        # Cross-entropy in float32: the softmax stays high precision (docs/training.md §2).
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss
