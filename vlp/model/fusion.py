"""Cross-modal fusion encoder: Transformer blocks over text tokens that cross-attend to image tokens.

Written from torch building blocks because transformers only allows cross-attention in causal decoders.
Blocks are post-norm like BERT so that their self-attention and MLP can start from a BERT layer. The
keys and values that image tokens feed to every cross-attention layer can be computed once per image
(:meth:`FusionEncoder.image_kv`) and reused for every caption scored against it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

KeyValue = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention whose keys and values may come from another width (image tokens)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"fusion width {dim} is not divisible by model.fusion.num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        kv_dim = kv_dim or dim
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, H, L, d)

    def project_kv(self, context: torch.Tensor) -> KeyValue:
        """Keys and values of ``context`` (B, N, C), each (B, H, N, d)."""
        return self._split_heads(self.key(context)), self._split_heads(self.value(context))

    def forward(self, x: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None = None) -> torch.Tensor:
        query = self._split_heads(self.query(x))  # (B, H, L, d)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, *kv, attn_mask=mask, dropout_p=dropout)  # (B, H, L, d)
        out = out.transpose(1, 2).flatten(2)  # (B, H, L, d) -> (B, L, H*d)
        return self.out(out)


class FusionBlock(nn.Module):
    """Bidirectional self-attention over text, cross-attention to image tokens, MLP; post-norm residuals."""

    def __init__(self, dim: int, image_dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout=dropout)
        self.cross_attn = Attention(dim, num_heads, kv_dim=image_dim, dropout=dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(dim, eps=1e-12),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim, eps=1e-12),
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, text_mask: torch.Tensor, image_kv: KeyValue, first_token_only: bool = False
    ) -> torch.Tensor:
        # Every text token is a key; with first_token_only only the first token is a query (exact for ITM).
        kv = self.self_attn.project_kv(x)
        if first_token_only:
            x = x[:, :1]  # (B, L, D) -> (B, 1, D)
        x = self.norm1(x + self.drop(self.self_attn(x, kv, text_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, image_kv)))
        return self.norm3(x + self.drop(self.mlp(x)))

    def init_from_bert_layer(self, layer: nn.Module) -> None:
        """Copy self-attention and MLP weights from a BERT-style layer; cross-attention stays freshly initialised."""
        pairs = [
            (self.self_attn.query, layer.attention.self.query),
            (self.self_attn.key, layer.attention.self.key),
            (self.self_attn.value, layer.attention.self.value),
            (self.self_attn.out, layer.attention.output.dense),
            (self.norm1, layer.attention.output.LayerNorm),
            (self.mlp[0], layer.intermediate.dense),
            (self.mlp[2], layer.output.dense),
            (self.norm3, layer.output.LayerNorm),
        ]
        for ours, theirs in pairs:
            ours.load_state_dict(theirs.state_dict())


class FusionEncoder(nn.Module):
    def __init__(
        self,
        dim: int,
        image_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            FusionBlock(dim, image_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )

    def init_from_text_layers(self, layers: list[nn.Module]) -> int:
        """Initialise the lowest blocks from BERT-style layers; returns how many were initialised."""
        count = 0
        for block, layer in zip(self.blocks, layers):
            try:
                block.init_from_bert_layer(layer)
            except (AttributeError, RuntimeError) as err:
                log.warning("fusion block %d keeps its random init: the text layer is not BERT-like (%s)", count, err)
                break
            count += 1
        return count

    def image_kv(self, image_embeds: torch.Tensor) -> list[KeyValue]:
        """Cross-attention keys and values of image tokens (B, N, C) for every block, each (B, H, N, d)."""
        return [block.cross_attn.project_kv(image_embeds) for block in self.blocks]

    def forward(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[KeyValue] | None = None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Fuse text tokens (B, L, D) with image tokens (B, N, C) or their precomputed keys and values.

        With ``first_token_only`` the last block computes only the first token, (B, 1, D): all that ITM
        reads, at a fraction of the last block's cost.
        """
        if image_kv is None:
            image_kv = self.image_kv(image_embeds)
        mask = text_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L): padded keys are ignored
        x = text_embeds
        last = len(self.blocks) - 1
        for i, (block, kv) in enumerate(zip(self.blocks, image_kv)):
            x = block(x, mask, kv, first_token_only=first_token_only and i == last)
        return x  # (B, L, D), or (B, 1, D) with first_token_only
