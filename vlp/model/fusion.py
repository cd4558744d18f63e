"""Cross-modal fusion encoder: Transformer blocks over text tokens that cross-attend to image tokens.

Written from torch building blocks because transformers only allows cross-attention in causal decoders.
Blocks are post-norm like BERT so that their self-attention and MLP can start from a BERT layer. The
keys and values that image tokens feed to every cross-attention layer can be computed once per image
(:meth:`FusionEncoder.image_kv`) and reused for every caption scored against it, without copies
(:class:`GroupedKeyValues`); the first block's self-attention depends on the caption alone and can be computed
once per caption (:meth:`FusionEncoder.attend_text`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

KeyValue = tuple[torch.Tensor, torch.Tensor]


class GroupedKeyValues:
    """Cross-attention keys and values (G, H, N, d) of G images, image g shared by ``counts[g]`` consecutive rows.

    A batch of pairs sorted by image attends without a per-pair copy of the keys and values: the rows of a run
    of images with equal counts r are folded into the query length, (G_run * r, L, D) -> (G_run, r * L, D), and
    attend in one call. Exact, because cross-attention has no mask: each query row sees its image's keys either way.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, runs: list[tuple[int, int, int, int]]):
        self.key, self.value, self.runs = key, value, runs
        self.rows = runs[-1][1] if runs else 0

    @staticmethod
    def runs_of(counts: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """(first row, last row + 1, first image, last image + 1) of each run of images with equal ``counts``."""
        counts = counts.tolist()
        runs, row, image = [], 0, 0
        while image < len(counts):
            end = image
            while end < len(counts) and counts[end] == counts[image]:
                end += 1
            runs.append((row, row + counts[image] * (end - image), image, end))
            row, image = row + counts[image] * (end - image), end
        return runs


def group_kv(image_kv: list[KeyValue], counts: torch.Tensor) -> list[GroupedKeyValues]:
    """Wrap every layer's keys/values (G, H, N, d) for a batch whose rows are sorted by image, ``counts`` per image."""
    runs = GroupedKeyValues.runs_of(counts)  # the same for every layer
    if image_kv and image_kv[0][0].shape[0] != counts.shape[0]:
        raise ValueError(f"{image_kv[0][0].shape[0]} images of keys/values but {counts.shape[0]} row counts")
    return [GroupedKeyValues(k, v, runs) for k, v in image_kv]


def image_major_order(
    pair_image: torch.Tensor, within: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair order that :func:`group_kv` needs, with the distinct images and their pair counts in that order.

    Pairs are sorted by their image's pair count, then by image (so images with equal counts form runs), then by
    ``within`` (non-negative integers, e.g. caption lengths). Returns ``(order (P,), images (G,), counts (G,))``:
    ``pair_image[order]`` is ``images`` repeated ``counts`` times.
    """
    images, pair_to_image, counts = torch.unique(pair_image, return_inverse=True, return_counts=True)

    # Rank of each distinct image in (count, image id) order; torch.unique already sorted the ids.
    by_count = counts.argsort(stable=True)  # (G,)
    slot = torch.empty_like(by_count)
    slot[by_count] = torch.arange(by_count.shape[0], device=by_count.device)

    # Pair keys: the image's slot, refined by ``within``.
    key = slot[pair_to_image]  # (P,)
    if within is not None and within.numel():
        key = key * (int(within.max()) + 1) + within
    return key.argsort(stable=True), images[by_count], counts[by_count]


class TokenPacking:
    """The valid tokens of a right-padded (B, L) batch, packed to (T, D) for the linear layers.

    Projections and MLPs see only the T real tokens (captions of mixed length waste a third of a padded batch
    on padding); attention unpacks its inputs to (B, L, D). Unpacked padding is zero and never a valid key.
    """

    def __init__(self, mask: torch.Tensor):
        self.batch, self.length = mask.shape
        self.index = None if bool(mask.all()) else mask.flatten().nonzero().squeeze(1)  # (T,); None: no padding
        # Packed row of each caption's first token, whose position 0 is always valid ([CLS]).
        lengths = mask.sum(dim=1)
        self.first_rows = torch.cumsum(lengths, 0) - lengths  # (B,)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x.flatten(0, 1)  # (B, L, D) -> (B*L, D)
        return x.flatten(0, 1).index_select(0, self.index)  # (B, L, D) -> (T, D)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x.view(self.batch, self.length, -1)  # (B*L, D) -> (B, L, D)
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)  # (B*L, D)
        return out.view(self.batch, self.length, -1)  # (B*L, D) -> (B, L, D)

    def first_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenPacking]:
        """Each caption's first token (B, D) of packed ``x``, and the packing of a batch of one token each."""
        mask = torch.ones(self.batch, 1, dtype=torch.bool, device=self.first_rows.device)
        return x.index_select(0, self.first_rows), TokenPacking(mask)


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

    def attend(self, query: torch.Tensor, kv: KeyValue | GroupedKeyValues, mask: torch.Tensor | None = None):
        """Attention of projected queries (B, L, D) to keys/values; (B, L, D), before the output projection."""
        if isinstance(kv, GroupedKeyValues):
            return self._attend_grouped(query, kv)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(self._split_heads(query), *kv, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).flatten(2)  # (B, H, L, d) -> (B, L, H*d)

    def _attend_grouped(self, query: torch.Tensor, kv: GroupedKeyValues) -> torch.Tensor:
        """Unmasked attention of query rows (B, L, D) sorted by image to their image's keys/values, (B, L, D)."""
        if kv.rows != query.shape[0]:
            raise ValueError(f"grouped keys/values cover {kv.rows} rows, the batch has {query.shape[0]}")
        dropout = self.dropout if self.training else 0.0
        _, length, dim = query.shape
        outs = []
        for row0, row1, image0, image1 in kv.runs:
            # The run's rows fold into its images' query length: a view, as the rows are contiguous.
            folded = query[row0:row1].reshape(image1 - image0, -1, dim)  # (G*r, L, D) -> (G, r*L, D)
            key, value = kv.key[image0:image1], kv.value[image0:image1]  # (G, H, N, d)
            out = F.scaled_dot_product_attention(self._split_heads(folded), key, value, dropout_p=dropout)
            outs.append(out.transpose(1, 2).reshape(row1 - row0, length, dim))  # (G, H, r*L, d) -> (G*r, L, D)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class FusionBlock(nn.Module):
    """Bidirectional self-attention over text, cross-attention to image tokens, MLP; post-norm residuals.

    Works on packed text tokens (T, D) (see :class:`TokenPacking`). Either half can be skipped: the
    self-attention sees the caption alone, so it can be computed once per caption and reused for every image.
    Both halves run through ``forward``, so that wrappers (FSDP, activation checkpointing) see every call.
    """

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
        self,
        x: torch.Tensor,
        packing: TokenPacking,
        key_mask: torch.Tensor | None = None,
        image_kv: KeyValue | GroupedKeyValues | None = None,
        first_token_only: bool = False,
    ) -> tuple[torch.Tensor, TokenPacking]:
        """Packed tokens (T, D) -> (T', D) and their packing; no ``key_mask``: the self-attention was done,
        no ``image_kv``: only the self-attention. ``first_token_only`` keeps one query token per caption."""
        if key_mask is not None:
            x, packing = self._attend_text(x, packing, key_mask, first_token_only)
        elif first_token_only:
            x, packing = packing.first_tokens(x)
        if image_kv is not None:
            x = self._attend_image(x, packing, image_kv)
        return x, packing

    def _attend_text(self, x, packing: TokenPacking, key_mask: torch.Tensor, first_token_only: bool):
        # Every text token is a key; with first_token_only only the first token is a query (exact for ITM).
        attn = self.self_attn
        kv = attn._split_heads(packing.unpack(attn.key(x))), attn._split_heads(packing.unpack(attn.value(x)))
        if first_token_only:
            x, packing = packing.first_tokens(x)  # (T, D) -> (B, D)
        out = packing.pack(attn.attend(packing.unpack(attn.query(x)), kv, key_mask))  # (T, D)
        return self.norm1(x + self.drop(attn.out(out))), packing

    def _attend_image(self, x: torch.Tensor, packing: TokenPacking, image_kv) -> torch.Tensor:
        attn = self.cross_attn
        out = packing.pack(attn.attend(packing.unpack(attn.query(x)), image_kv))  # (T, D)
        x = self.norm2(x + self.drop(attn.out(out)))
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

    def attend_text(self, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The first block's self-attention over text tokens, (B, L, D) -> (B, L, D).

        It depends on the caption alone: a caption paired with many images needs it once. Pass the result to
        :meth:`forward` with ``text_attended=True``. Padded positions are zero.
        """
        packing = _packing(text_mask)
        x, packing = self.blocks[0](packing.pack(text_embeds), packing, _key_mask(text_mask))
        return packing.unpack(x)

    def forward(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[KeyValue] | list[GroupedKeyValues] | None = None,
        first_token_only: bool = False,
        text_attended: bool = False,
    ) -> torch.Tensor:
        """Fuse right-padded text tokens (B, L, D) with image tokens (B, N, C) or their keys and values.

        With ``first_token_only`` the last block computes only the first token, (B, 1, D): all that ITM
        reads, at a fraction of the last block's cost. With ``text_attended`` the input is already the output
        of :meth:`attend_text`, and the first block starts at its cross-attention. Padded positions of the
        output are zero.
        """
        if image_kv is None:
            image_kv = self.image_kv(image_embeds)
        packing = _packing(text_mask)
        mask = _key_mask(text_mask)
        x = packing.pack(text_embeds)  # (B, L, D) -> (T, D): the linear layers skip padding
        last = len(self.blocks) - 1
        for i, (block, kv) in enumerate(zip(self.blocks, image_kv)):
            skip_text = i == 0 and text_attended
            x, packing = block(x, packing, None if skip_text else mask, kv, first_token_only and i == last)
        return packing.unpack(x)  # (T, D) -> (B, L, D), or (B, 1, D) with first_token_only


def _packing(text_mask: torch.Tensor) -> TokenPacking:
    if not bool(text_mask[:, 0].all()):
        raise ValueError("the fusion encoder expects right-padded captions: every first token ([CLS]) unmasked")
    return TokenPacking(text_mask.bool())


def _key_mask(text_mask: torch.Tensor) -> torch.Tensor:
    return text_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L): padded keys are ignored
