"""The ALBEF/BLIP-style model: two towers, a fusion encoder, ITC with momentum and queue, ITM with hard negatives
and optionally image-conditioned MLM."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from vlp.dist import all_gather_nograd, all_gather_with_grad, rank_offset
from vlp.losses import (
    IGNORE_INDEX,
    contrastive_loss,
    itc_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    positive_targets,
    sample_hard_negatives,
)
from vlp.model.config import ModelConfig
from vlp.model.encoders import ImageEncoder, TextEncoder
from vlp.model.fusion import FusionEncoder, GroupedKeyValues, KeyValue, group_kv, image_major_order
from vlp.model.queue import FeatureQueue
from vlp.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("text_encoder", "text_encoder_m"))
MOMENTUM_PAIRS += (("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m"))


class MaskedTokenHead(nn.Module):
    """BERT's prediction head over fused text tokens: dense, GELU, LayerNorm, then vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(tokens))  # (M, D) -> (M, V)


class VLPModel(nn.Module):
    """Image tower + text tower + fusion encoder, trained with ITC and ITM (and MLM with ``model.mlm``).

    ``forward(batch)`` returns the losses and training metrics. For users' own code: ``encode_image``,
    ``encode_text``, ``itm_logits`` and ``itm_score``; ``vlp.export`` saves and ``from_pretrained`` loads.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, load_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = tokenizer or load_tokenizer(cfg.text_encoder.tokenizer or cfg.text_encoder.name)

        # Towers, then the fusion encoder, optionally started from the text tower's top layers (ALBEF).
        self.visual_encoder = ImageEncoder(cfg.image_encoder, load_weights=load_weights)
        self.text_encoder = TextEncoder(cfg.text_encoder, vocab_size=len(self.tokenizer), load_weights=load_weights)
        top_layers = self.text_encoder.pop_top_layers()
        if cfg.itm or cfg.mlm:
            self.fusion = self._build_fusion(top_layers)
        if cfg.itm:
            self.itm_head = nn.Linear(self.text_encoder.width, 2)
        if cfg.mlm:
            self._init_mlm()

        # Shared embedding space and the learnable temperature.
        self.vision_proj = nn.Linear(self.visual_encoder.width, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temperature))

        # Momentum copies (never trained by the optimizer) and the queue of their features.
        if cfg.momentum:
            for online, momentum in MOMENTUM_PAIRS:
                setattr(self, momentum, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        self.queue = FeatureQueue(cfg.queue_size, cfg.embed_dim) if cfg.queue_size > 0 else None
        self._pending: list[tuple[torch.Tensor, ...]] = []

    def _init_mlm(self) -> None:
        if self.tokenizer.mask_token_id is None:
            raise ValueError("model.mlm=true needs a tokenizer with a mask token; this one has none")
        self.mlm_head = MaskedTokenHead(self.text_encoder.width, len(self.tokenizer))
        # Padding, [CLS], [SEP], [MASK] and other special tokens are never chosen (a buffer: follows the device).
        special = torch.tensor(sorted(self.tokenizer.all_special_ids), dtype=torch.long)
        self.register_buffer("special_ids", special, persistent=False)

    def _build_fusion(self, top_layers: list[nn.Module]) -> FusionEncoder:
        fusion_cfg = self.cfg.fusion
        fusion = FusionEncoder(
            dim=self.text_encoder.width,
            image_dim=self.visual_encoder.width,
            num_layers=fusion_cfg.num_layers,
            num_heads=fusion_cfg.num_heads or self.text_encoder.num_heads,
            mlp_ratio=fusion_cfg.mlp_ratio or self.text_encoder.mlp_ratio,
            dropout=fusion_cfg.dropout,
        )
        if fusion_cfg.init_from_text:
            # Without layers split off the text tower, the fusion starts from copies of its top layers.
            count = fusion.init_from_text_layers(
                top_layers or self.text_encoder.top_layer_copies(fusion_cfg.num_layers)
            )
            log.info(
                "fusion: %d of %d blocks initialised from the text encoder's top layers", count, len(fusion.blocks)
            )
        return fusion

    # ----- encoders -------------------------------------------------------------------------------------------

    def temperature(self) -> torch.Tensor:
        """The learnable temperature, clamped in place on every call (every forward of every mode)."""
        with torch.no_grad():
            self.temp.clamp_(self.cfg.temperature_min, self.cfg.temperature_max)
        return self.temp

    def encode_image(self, image: torch.Tensor, momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens ``image_embeds`` (B, N, C) and the L2-normalised ``image_feat`` (B, E)."""
        encoder, proj = self._image_modules(momentum)
        image_embeds, pooled = encoder(image)
        return image_embeds, F.normalize(proj(pooled), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens ``text_embeds`` (B, L, D) and the L2-normalised ``text_feat`` (B, E)."""
        encoder, proj = self._text_modules(momentum)
        text_embeds, pooled = encoder(input_ids, attention_mask)
        return text_embeds, F.normalize(proj(pooled), dim=-1)

    def _image_modules(self, momentum: bool) -> tuple[nn.Module, nn.Module]:
        return (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder, self.vision_proj)

    def _text_modules(self, momentum: bool) -> tuple[nn.Module, nn.Module]:
        return (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)

    def itm_logits(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[KeyValue] | list[GroupedKeyValues] | None = None,
        text_attended: bool = False,
    ) -> torch.Tensor:
        """Match logits (B, 2) from the fused first token; pass image tokens or their cached keys and values.

        With ``text_attended``, ``text_embeds`` is the output of ``fusion.attend_text`` (see :class:`FusionEncoder`).
        """
        fused = self.fusion(text_embeds, text_mask, image_embeds, image_kv, True, text_attended)  # (B, 1, D)
        return self.itm_head(fused[:, 0])

    @torch.no_grad()
    def itm_score(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability (B,) that each image matches the caption at the same position."""
        image_embeds, _ = self.encode_image(image)
        text_embeds, _ = self.encode_text(input_ids, attention_mask)
        logits = self.itm_logits(text_embeds, attention_mask, image_embeds=image_embeds)
        return logits.float().softmax(dim=-1)[:, 1]

    # ----- training -------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
        """Losses and metrics for a batch with ``image``, ``input_ids``, ``attention_mask`` and ``image_id``."""
        alpha = self.cfg.alpha if alpha is None else alpha
        temperature = self.temperature()
        image_ids = batch["image_id"]
        image_embeds, image_pooled = self.visual_encoder(batch["image"])
        text_embeds, text_pooled = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        image_feat = F.normalize(self.vision_proj(image_pooled), dim=-1)
        text_feat = F.normalize(self.text_proj(text_pooled), dim=-1)

        out = {"temperature": temperature.detach()}
        if self.cfg.momentum:
            image_feat_m, text_feat_m = self._momentum_features(batch, image_pooled, text_pooled)
            out["itc_loss"] = self._itc_momentum(image_feat, text_feat, image_feat_m, text_feat_m, image_ids, alpha)
        else:
            out["itc_loss"] = itc_loss(image_feat, text_feat, temperature, image_ids)
        loss = out["itc_loss"]
        if self.cfg.itm:
            itm_inputs = (image_embeds, text_embeds, batch["attention_mask"], image_feat, text_feat, image_ids)
            out.update(self._itm(*itm_inputs, temperature))
            loss = loss + out["itm_loss"]
        if self.cfg.mlm:
            out.update(self._mlm(batch["input_ids"], batch["attention_mask"], image_embeds))
            loss = loss + out["mlm_loss"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _momentum_features(self, batch, image_pooled, text_pooled) -> tuple[torch.Tensor, torch.Tensor]:
        # A frozen tower's momentum copy equals the tower, so its pooled output is reused rather than recomputed.
        if not self.visual_encoder.frozen:
            image_pooled = self.visual_encoder_m(batch["image"])[1]
        if not self.text_encoder.frozen:
            text_pooled = self.text_encoder_m(batch["input_ids"], batch["attention_mask"])[1]
        image_feat_m = F.normalize(self.vision_proj_m(image_pooled.detach()), dim=-1)
        return image_feat_m, F.normalize(self.text_proj_m(text_pooled.detach()), dim=-1)

    def _itc_momentum(self, image_feat, text_feat, image_feat_m, text_feat_m, image_ids, alpha) -> torch.Tensor:
        temperature = self.temp
        # Keys are momentum features of the world batch followed by the queue; no gradient flows into keys.
        with torch.no_grad():
            all_image_feat_m, all_text_feat_m = all_gather_nograd(image_feat_m), all_gather_nograd(text_feat_m)
            all_ids = all_gather_nograd(image_ids)
            if self.training:
                self._pending.append((all_image_feat_m, all_text_feat_m, all_ids))
            image_keys, text_keys, key_ids = self._with_queue(all_image_feat_m, all_text_feat_m, all_ids)

            # Targets: every key with the same image id, softened by the momentum model's own similarities.
            targets = positive_targets(image_ids, key_ids)  # (B, K)
            targets_i2t = targets_t2i = targets
            if self.cfg.distill and alpha > 0:
                sim_i2t_m = image_feat_m.float() @ text_keys.float().t() / temperature  # (B, K)
                sim_t2i_m = text_feat_m.float() @ image_keys.float().t() / temperature  # (B, K)
                targets_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1 - alpha) * targets
                targets_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1 - alpha) * targets

        loss_i2t = contrastive_loss(image_feat, text_keys, temperature, targets_i2t)
        loss_t2i = contrastive_loss(text_feat, image_keys, temperature, targets_t2i)
        return (loss_i2t + loss_t2i) / 2

    def _with_queue(self, image_feat_m, text_feat_m, image_ids):
        if self.queue is None:
            return image_feat_m, text_feat_m, image_ids
        image_q, text_q, ids_q = self.queue.keys()
        return torch.cat([image_feat_m, image_q]), torch.cat([text_feat_m, text_q]), torch.cat([image_ids, ids_q])

    def _itm_candidates(self, image_embeds, text_embeds, text_mask, image_feat, text_feat, image_ids):
        """Pairs that negatives are drawn from: this rank's batch, or the world batch with gradient."""
        if self.cfg.itm_negatives == "local":
            return image_embeds, text_embeds, text_mask, image_feat, text_feat, image_ids, 0
        # Captions are padded to the configured length so that every rank's tokens have the same shape.
        pad = self.cfg.text_encoder.max_length - text_embeds.shape[1]
        text_embeds, text_mask = F.pad(text_embeds, (0, 0, 0, pad)), F.pad(text_mask, (0, pad))  # (B, L_max, D)
        offset = rank_offset(image_embeds.shape[0], image_embeds.device)
        return (
            all_gather_with_grad(image_embeds),  # (N*B, N_img, C)
            all_gather_with_grad(text_embeds),  # (N*B, L_max, D)
            all_gather_nograd(text_mask),
            all_gather_nograd(image_feat),
            all_gather_nograd(text_feat),
            all_gather_nograd(image_ids),
            offset,
        )

    def _itm(self, image_embeds, text_embeds, text_mask, image_feat, text_feat, image_ids, temperature):
        batch_size = image_embeds.shape[0]
        cand = self._itm_candidates(image_embeds, text_embeds, text_mask, image_feat, text_feat, image_ids)
        cand_image_embeds, cand_text_embeds, cand_text_mask, cand_image_feat, cand_text_feat, cand_ids, offset = cand

        # Hard negatives drawn from the ITC similarities, k per image and per caption; this rank keeps the draws
        # for its own rows.
        k = self.cfg.itm_hard_negatives
        with torch.no_grad():
            sim_i2t = cand_image_feat.float() @ cand_text_feat.float().t() / temperature  # (B_cand, B_cand)
            neg_text, neg_image = sample_hard_negatives(sim_i2t, cand_ids, num_negatives=k)  # (B_cand, k) each
            neg_text, neg_image = neg_text[offset : offset + batch_size], neg_image[offset : offset + batch_size]
        has_neg_text, has_neg_image = neg_text >= 0, neg_image >= 0

        # One fusion pass over B positives, then (image, hard text) and (hard image, text) negatives.
        local = torch.arange(offset, offset + batch_size, device=neg_text.device)
        local_k = local[:, None].expand(-1, k)  # (B, k)
        image_index = torch.cat([local, local_k[has_neg_text], neg_image[has_neg_image]])  # (P,)
        text_index = torch.cat([local, neg_text[has_neg_text], local_k[has_neg_image]])  # (P,)
        logits = self._itm_pair_logits(cand_image_embeds, cand_text_embeds, cand_text_mask, image_index, text_index)

        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:batch_size] = 1
        invalid_rows = (~has_neg_text).sum() + (~has_neg_image).sum()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"itm_loss": itm_loss(logits, labels), "itm_acc": accuracy, "itm_invalid_rows": invalid_rows}

    def _itm_pair_logits(self, image_embeds, text_embeds, text_mask, image_index, text_index) -> torch.Tensor:
        """ITM logits (P, 2) of the pairs (image_embeds[image_index], text_embeds[text_index])."""
        # Each distinct caption's first-block self-attention is computed once (it does not see the image).
        texts, pair_to_text = torch.unique(text_index, return_inverse=True)
        attended = self.fusion.attend_text(text_embeds[texts], text_mask[texts])  # (T, L, D)

        # Pairs sorted by image, images with equal pair counts adjacent: each distinct image's cross-attention
        # keys and values are computed once and shared by its pairs without copies (GroupedKeyValues).
        order, images, counts = image_major_order(image_index)
        image_kv = group_kv(self.fusion.image_kv(image_embeds[images]), counts)
        text_rows = pair_to_text[order]
        logits = self.itm_logits(
            attended[text_rows], text_mask[texts][text_rows], image_kv=image_kv, text_attended=True
        )

        # Back to the caller's pair order.
        return logits[order.argsort()]  # (P, 2)

    def _mlm(self, input_ids, text_mask, image_embeds) -> dict[str, torch.Tensor]:
        """Masked tokens predicted from the fused text: the masked caption is re-encoded and attends to the image.

        Unlike ALBEF, the targets are the true tokens only (no soft targets from the momentum model).
        """
        # Corrupt the word tokens, encode the corrupted caption, fuse it with the image.
        maskable = text_mask.bool() & ~torch.isin(input_ids, self.special_ids)  # (B, L)
        masked_ids, labels = mask_tokens(
            input_ids, maskable, self.tokenizer.mask_token_id, self.mlm_head.vocab_size, self.cfg.mlm_probability
        )
        masked_embeds, _ = self.text_encoder(masked_ids, text_mask)
        fused = self.fusion(masked_embeds, text_mask, image_embeds)  # (B, L, D)

        # Vocabulary logits for the chosen positions only.
        chosen = labels != IGNORE_INDEX  # (B, L)
        logits = self.mlm_head(fused[chosen])  # (M, V)
        targets = labels[chosen]  # (M,)
        accuracy = (logits.argmax(dim=1) == targets).float().sum() / max(targets.numel(), 1)
        return {"mlm_loss": mlm_loss(logits, targets), "mlm_acc": accuracy}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Once per optimizer step (not per micro-batch): EMA of the momentum copies, then enqueue their features."""
        if self.cfg.momentum:
            decay = self.cfg.momentum_decay
            for online, momentum in MOMENTUM_PAIRS:
                params = list(getattr(self, online).parameters())
                params_m = list(getattr(self, momentum).parameters())
                torch._foreach_mul_(params_m, decay)
                torch._foreach_add_(params_m, params, alpha=1 - decay)
        if self.queue is not None:
            for pending in self._pending:
                self.queue.enqueue(*pending)
        self._pending.clear()

    @property
    def num_pending(self) -> int:
        """Micro-batches whose momentum features wait for the next optimizer step to enter the queue."""
        return len(self._pending)

    def drop_pending(self, keep: int = 0) -> None:
        """Forget the pending momentum features after the first ``keep`` micro-batches (a step that is skipped)."""
        del self._pending[keep:]

    # ----- export ---------------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir) -> None:
        """Write a self-contained directory (safetensors weights, config, tokenizer); see :func:`vlp.export`."""
        from vlp.checkpoint import export_model

        export_model(self, out_dir)

    @classmethod
    def from_pretrained(cls, export_dir) -> VLPModel:
        """Load a directory written by :meth:`save_pretrained`, with no training state, in eval mode."""
        from vlp.checkpoint import load_exported

        return load_exported(export_dir)
