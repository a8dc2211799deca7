"""The GPT of ``../shared/docs/anchors.md`` in plain torch, as DeepSpeed ``LayerSpec``s (size configurable).

Default size: 32 layers, hidden 2048, 16 heads, seq 2048, vocab 32000, SDPA causal attention, LayerNorm,
GELU MLP 4h. The embedding is the first pipeline layer, final LayerNorm + LM head the last two.

Every layer initialises its own weights from ``seed + layer index`` with a private generator, so the same
config gives the same weights however the layers are partitioned over stages (what the parity tests and the
side-by-side benchmark need). :func:`reference_model` builds the same layers as one ``nn.Sequential``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPTConfig",
    "ANCHOR",
    "TINY",
    "Embedding",
    "TransformerLayer",
    "FinalNorm",
    "LMHead",
    "gpt_loss",
    "layer_specs",
    "build_layer",
    "build_layers",
    "reference_model",
    "tied_head_forward",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    """Shape of the GPT."""

    layers: int = 32
    """Transformer layers."""
    hidden: int = 2048
    """Model width."""
    heads: int = 16
    """Attention heads (hidden must divide by it)."""
    seq: int = 2048
    """Sequence length."""
    vocab: int = 32000
    """Vocabulary size."""
    seed: int = 1234
    """Layer i is initialised from ``seed + i``."""
    tied_embeddings: bool = False
    """LM head reuses the token-embedding matrix (DeepSpeed ``TiedLayerSpec``)."""

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if min(self.layers, self.hidden, self.heads, self.seq, self.vocab) < 1:
            raise ValueError("every GPT size must be >= 1")

    @property
    def num_pipeline_layers(self) -> int:
        """Layers in the pipeline list: embedding, transformer layers, final norm, head."""
        return self.layers + 3

    def tokens_per_sample(self) -> int:
        return self.seq


ANCHOR = GPTConfig()
TINY = GPTConfig(layers=4, hidden=32, heads=4, seq=16, vocab=64)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.no_grad()
def _init_linear(linear: nn.Linear, g: torch.Generator, std: float) -> None:
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * std)
    if linear.bias is not None:
        linear.bias.zero_()


class Embedding(nn.Module):
    """Token + learned position embedding: ids (B, S) -> hidden (B, S, H)."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position = nn.Embedding(cfg.seq, cfg.hidden)
        g = _generator(seed)
        with torch.no_grad():
            self.word.weight.copy_(torch.randn(self.word.weight.shape, generator=g) * 0.02)
            self.position.weight.copy_(torch.randn(self.position.weight.shape, generator=g) * 0.02)

    @property
    def weight(self) -> torch.Tensor:  # what TiedLayerSpec ties (tied_weight_attr="weight")
        return self.word.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return self.word(ids) + self.position(positions)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: causal SDPA attention and a GELU MLP of width 4h, both residual."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        h = cfg.hidden
        self.ln_attn = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln_mlp = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)
        g = _generator(seed)
        std = 0.02
        for lin in (self.qkv, self.fc1):
            _init_linear(lin, g, std)
        for lin in (self.proj, self.fc2):  # GPT-2 style scaled residual init
            _init_linear(lin, g, std / math.sqrt(2 * cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln_mlp(x))))


class FinalNorm(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class LMHead(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        self.out = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        _init_linear(self.out, _generator(seed), 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def tied_head_forward(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    """LM head that reuses the token-embedding matrix (``TiedLayerSpec(forward_fn=...)``)."""
    return F.linear(x, embedding.word.weight)


def gpt_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; ``labels`` are already shifted by the data pipeline."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def layer_specs(cfg: GPTConfig) -> list:
    """The model as DeepSpeed ``LayerSpec``s / ``TiedLayerSpec``s (for ``PipelineModule(layers=...)``)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs: list = []
    if cfg.tied_embeddings:
        specs.append(TiedLayerSpec("embed", Embedding, cfg, cfg.seed, tied_weight_attr="word.weight"))
    else:
        specs.append(LayerSpec(Embedding, cfg, cfg.seed))
    for i in range(cfg.layers):
        specs.append(LayerSpec(TransformerLayer, cfg, cfg.seed + 1 + i))
    specs.append(LayerSpec(FinalNorm, cfg, cfg.seed + 1 + cfg.layers))
    if cfg.tied_embeddings:
        specs.append(
            TiedLayerSpec("embed", Embedding, cfg, cfg.seed, forward_fn=tied_head_forward, tied_weight_attr="word.weight")
        )
    else:
        specs.append(LayerSpec(LMHead, cfg, cfg.seed + 2 + cfg.layers))
    return specs


def build_layer(cfg: GPTConfig, index: int) -> nn.Module:
    """Pipeline layer ``index`` alone (untied models), with the same weights :func:`layer_specs` gives it."""
    if cfg.tied_embeddings:
        raise ValueError("build_layer builds untied models only; use build_layers for tied embeddings")
    if index == 0:
        return Embedding(cfg, cfg.seed)
    if index <= cfg.layers:
        return TransformerLayer(cfg, cfg.seed + index)
    if index == cfg.layers + 1:
        return FinalNorm(cfg, cfg.seed + 1 + cfg.layers)
    if index == cfg.layers + 2:
        return LMHead(cfg, cfg.seed + 2 + cfg.layers)
    raise ValueError(f"layer index {index} out of range 0..{cfg.layers + 2}")


def build_layers(cfg: GPTConfig) -> list[nn.Module]:
    """The same layers as :func:`layer_specs`, built (tied head: a callable sharing the embedding)."""
    emb = Embedding(cfg, cfg.seed)
    layers: list = [emb]
    layers += [TransformerLayer(cfg, cfg.seed + 1 + i) for i in range(cfg.layers)]
    layers.append(FinalNorm(cfg, cfg.seed + 1 + cfg.layers))
    layers.append(_TiedHead(emb) if cfg.tied_embeddings else LMHead(cfg, cfg.seed + 2 + cfg.layers))
    return layers


class _TiedHead(nn.Module):
    def __init__(self, embedding: Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # not registered: the weight belongs to the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tied_head_forward(self._embedding[0], x)


def reference_model(cfg: GPTConfig) -> nn.Sequential:
    """Single-process reference: the pipeline's layers in one ``nn.Sequential``."""
    return nn.Sequential(*build_layers(cfg))


def synthetic_batches(cfg: GPTConfig, batch: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (ids, labels) pairs of shape (batch, seq); labels are ids shifted by one (deterministic)."""
    g = _generator(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def with_size(cfg: GPTConfig, **changes) -> GPTConfig:
    return replace(cfg, **changes)
