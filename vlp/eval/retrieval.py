"""Image-text retrieval evaluation: ITC top-k candidates in both directions, re-ranked with the ITM head.

Pipeline (every process runs it; one process is the special case of a world of one):

1. Images. Every process encodes the image batches it is given (its shard) and keeps their ITC features and,
   when re-ranking, their tokens. Only the features (N_img, E) and the image indices are gathered. An image
   seen by several processes (a padding ``DistributedSampler`` repeats some) is owned by the first one.
2. Captions. Every process tokenizes all captions (cheap) with one global padding length, encodes a contiguous
   shard for ITC features and gathers the features (N_txt, E).
3. ITC. Similarities are computed in chunks of ``chunk_size`` query rows, chunks dealt round-robin to the
   processes; each chunk yields the top-k candidates and the exact ITC rank of the ground truth. The compact
   lists are gathered, so every process knows every query's candidates.
4. Re-rank. Image tokens never leave their owner: each process scores the (image, caption) pairs whose image
   it owns, for both directions, each distinct pair once. Caption tokens are recomputed for the captions these
   pairs need (about one caption-encoder pass per process, small next to k fusion passes per query), together
   with the fusion's first self-attention, which sees the caption alone (``FusionEncoder.attend_text``). Pairs
   are sorted by image (then caption length, so that a batch is cut to its longest caption) and packed into
   fixed-size batches across queries; the cross-attention keys and values of each image
   (``FusionEncoder.image_kv``) are computed exactly once and shared by its pairs without copies
   (``GroupedKeyValues``). Scores are summed into the (queries, k) lists with an all-reduce (each entry is
   written by one process only).

Memory: image tokens of this process's shard, caption tokens of the captions it needs, (N, k) lists and one
(chunk_size, N) similarity block; never an N_img x N_txt matrix.

Final ranks: candidates of a query are re-ordered by the final score (ties: smaller index first). A ground
truth outside the ITC top-k keeps its ITC rank (> k): the candidates not re-ranked are placed after the k
re-ranked ones, in ITC order. Ranks are therefore those of a full ordering and mean ranks are exact.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from vlp.dist import all_gather_nograd, all_reduce_sum, get_rank, get_world_size
from vlp.eval.config import RetrievalConfig
from vlp.eval.metrics import (
    TopK,
    check_ground_truth,
    dense_ranks,
    metrics_from_ranks,
    pad_positives,
    sort_topk,
    stable_topk,
    topk_ranks,
)
from vlp.model.fusion import GroupedKeyValues, KeyValue, image_major_order

log = logging.getLogger(__name__)


@dataclass
class RetrievalResult:
    """Metrics plus what produced them; top-k lists are sorted best first, ranks are 1-based (numpy)."""

    metrics: dict[str, float]  # flat: re-ranked keys and the same keys prefixed ``itc_``
    i2t: TopK  # final lists of caption indices per image (ITC lists when not re-ranked)
    t2i: TopK  # final lists of image indices per caption
    itc_i2t: TopK
    itc_t2i: TopK
    tr_ranks: np.ndarray
    ir_ranks: np.ndarray
    itc_tr_ranks: np.ndarray
    itc_ir_ranks: np.ndarray
    reranked: bool
    stats: dict[str, int] = field(default_factory=dict)  # summed over processes


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items for ``rank``; sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


class _PairKeyValues:
    """Per-layer cross-attention keys/values of a window of images, grouped for one batch of image-sorted pairs."""

    def __init__(self, window: list[KeyValue], rows: torch.Tensor):
        # Rows are the pairs' window positions, sorted, and every position between the first and last occurs.
        self.window, self.first = window, int(rows[0])
        counts = torch.unique_consecutive(rows, return_counts=True)[1]
        self.last = self.first + counts.shape[0]
        self.runs = GroupedKeyValues.runs_of(counts)  # computed once, shared by every layer

    def __len__(self) -> int:
        return len(self.window)

    def __getitem__(self, layer: int) -> GroupedKeyValues:
        k, v = self.window[layer]
        return GroupedKeyValues(k[self.first : self.last], v[self.first : self.last], self.runs)  # (G, H, N, d)

    def __iter__(self) -> Iterator[GroupedKeyValues]:
        return (self[layer] for layer in range(len(self)))


class RetrievalEvaluator:
    """Accumulates image batches, then computes retrieval metrics against a caption set.

    Usable inside a Lightning validation epoch (model on its device, in eval mode)::

        evaluator = RetrievalEvaluator(model, cfg, rerank=True)
        for batch in loader:  # this process's shard
            evaluator.add_images(batch["image"], batch["index"])
        result = evaluator.compute(texts, txt2img, img2txt)  # collective: every process must call it
    """

    def __init__(self, model: nn.Module, cfg: RetrievalConfig | None = None, rerank: bool = True):
        self.model = model
        self.cfg = cfg or RetrievalConfig()
        self.cfg.validate()
        self.rerank = rerank
        if rerank and not hasattr(model, "itm_head"):
            raise ValueError("re-ranking needs the ITM head, but the model was built with model.itm=false")
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self._indices: list[torch.Tensor] = []
        self._feats: list[torch.Tensor] = []
        self._tokens: list[torch.Tensor] = []

    # ----- precision --------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type != "cuda" or not self.cfg.autocast:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.cfg.autocast_dtype))

    def _cache_dtype(self) -> torch.dtype:
        # Cached tokens take the autocast dtype on CUDA (half the memory); float32 otherwise.
        if self.device.type == "cuda" and self.cfg.autocast:
            return getattr(torch, self.cfg.autocast_dtype)
        return torch.float32

    # ----- step 1: images -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def add_images(self, image: torch.Tensor, index: torch.Tensor | Sequence[int]) -> None:
        """Encode a batch of images (B, 3, H, W) whose dataset positions are ``index`` (B,)."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).to(self.device)
        if index.shape[0] != image.shape[0]:
            raise ValueError(f"got {image.shape[0]} images but {index.shape[0]} indices")
        if image.shape[0] == 0:  # a batch of padding only (uneven shards)
            return
        with self._autocast():
            image_embeds, image_feat = self.model.encode_image(image.to(self.device, non_blocking=True))
        self._indices.append(index)
        self._feats.append(image_feat.float())
        if self.rerank:
            self._tokens.append(image_embeds.to(self._cache_dtype()))

    def _gather_images(self, n_img: int) -> dict[str, torch.Tensor]:
        """All images' ITC features (n_img, E), their owner process, and where this process keeps its tokens."""
        rank = get_rank()
        embed_dim = self.model.cfg.embed_dim
        local_index = torch.cat(self._indices) if self._indices else torch.empty(0, dtype=torch.long)
        local_feat = torch.cat(self._feats) if self._feats else torch.empty(0, embed_dim)
        local_index, local_feat = local_index.to(self.device), local_feat.to(self.device)
        all_index, all_feat = all_gather_nograd(local_index), all_gather_nograd(local_feat)  # (sum B, ...)
        all_rank = all_gather_nograd(torch.full_like(local_index, rank))

        # The first occurrence (process order, then batch order) owns an image; duplicates are ignored.
        if all_index.numel() and (all_index.min() < 0 or all_index.max() >= n_img):
            raise ValueError(f"image batches hold indices outside [0, {n_img}) (len(img2txt) = {n_img})")
        order = all_index.argsort(stable=True)
        sorted_index = all_index[order]
        first = torch.ones_like(sorted_index, dtype=torch.bool)
        first[1:] = sorted_index[1:] != sorted_index[:-1]
        if int(first.sum()) != n_img:
            missing = sorted(set(range(n_img)) - set(sorted_index[first].tolist()))
            raise ValueError(f"{len(missing)} of {n_img} images were never added, e.g. index {missing[:5]}")
        first_pos = order[first]  # (n_img,) position of image i's first occurrence in the gathered order
        owner = all_rank[first_pos]

        # Rows of this process's own token cache, for the images it owns (-1 elsewhere).
        offset = int((all_rank < rank).sum())
        local_row = torch.full((n_img,), -1, dtype=torch.long, device=self.device)
        mine = owner == rank
        local_row[mine] = first_pos[mine] - offset
        return {"feat": all_feat[first_pos], "owner": owner, "local_row": local_row}

    # ----- step 2: captions ---------------------------------------------------------------------------------------

    def _tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # One padding length for the whole set, so a caption's encoding never depends on its batch.
        tok = self.model.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.model.cfg.text_encoder.max_length,
            return_tensors="pt",
        )
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def _encode_texts(self, input_ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, tokens: bool):
        """Features (R, E) or first-fusion-block tokens (R, L, D) of the captions ``rows``, in batches."""
        out = []
        for start in range(0, rows.shape[0], self.cfg.batch_size):
            batch = rows[start : start + self.cfg.batch_size]
            with self._autocast():
                text_embeds, text_feat = self.model.encode_text(input_ids[batch], mask[batch])
                if tokens:  # the fusion's first self-attention sees the caption alone: once per caption
                    text_embeds = self.model.fusion.attend_text(text_embeds, mask[batch])  # (B, L, D)
            out.append(text_embeds.to(self._cache_dtype()) if tokens else text_feat.float())
        if out:
            return torch.cat(out)
        width = self.model.text_encoder.width
        shape = (0, input_ids.shape[1], width) if tokens else (0, self.model.cfg.embed_dim)
        return torch.empty(shape, device=self.device, dtype=self._cache_dtype() if tokens else torch.float32)

    def _gather_text_feats(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start, stop = shard_range(input_ids.shape[0], get_world_size(), get_rank())
        rows = torch.arange(start, stop, device=self.device)
        # Contiguous shards in process order: the gathered rows are already in caption order.
        return all_gather_nograd(self._encode_texts(input_ids, mask, rows, tokens=False))  # (N_txt, E)

    # ----- step 3: ITC --------------------------------------------------------------------------------------------

    def _itc_direction(self, query_feat, cand_feat, positives, k: int) -> tuple[TopK, torch.Tensor]:
        """Top-k candidate lists (N_q, k) and exact ITC ranks (N_q,) for one direction."""
        n_q, chunk = query_feat.shape[0], self.cfg.chunk_size
        pos, valid = pad_positives(positives, device=self.device)
        ids, idx, val, rnk = [], [], [], []

        # Fixed global chunks dealt round-robin: a query's scores do not depend on the number of processes.
        for start in range(get_rank() * chunk, n_q, get_world_size() * chunk):
            stop = min(start + chunk, n_q)
            sim = query_feat[start:stop] @ cand_feat.t()  # (c, E) @ (E, C) -> (c, C) cosine similarities
            top_idx, top_val = stable_topk(sim, k)
            ids.append(torch.arange(start, stop, device=self.device))
            idx.append(top_idx)
            val.append(top_val)
            rnk.append(dense_ranks(sim, pos[start:stop], valid[start:stop]))

        # Gather the compact lists and put every query back in its row.
        ids = all_gather_nograd(torch.cat(ids) if ids else torch.empty(0, dtype=torch.long, device=self.device))
        idx = all_gather_nograd(torch.cat(idx) if idx else torch.empty(0, k, dtype=torch.long, device=self.device))
        val = all_gather_nograd(torch.cat(val) if val else torch.empty(0, k, device=self.device))
        rnk = all_gather_nograd(torch.cat(rnk) if rnk else torch.empty(0, dtype=torch.long, device=self.device))
        indices, scores, itc_ranks = torch.empty_like(idx), torch.empty_like(val), torch.empty_like(rnk)
        indices[ids], scores[ids], itc_ranks[ids] = idx, val, rnk
        return TopK(indices, scores, cand_feat.shape[0]), itc_ranks

    # ----- step 4: re-rank ----------------------------------------------------------------------------------------

    def _owned_pairs(self, images, itc_i2t: TopK, itc_t2i: TopK, n_txt: int) -> torch.Tensor:
        """Sorted distinct keys ``image * n_txt + caption`` of the pairs whose image this process owns."""
        mine = images["owner"] == get_rank()
        rows = mine.nonzero().squeeze(1)
        keys_i2t = rows[:, None] * n_txt + itc_i2t.indices[rows]  # (R, k): image queries owned here
        cand_images = itc_t2i.indices  # (N_txt, k)
        captions = torch.arange(n_txt, device=self.device)[:, None].expand_as(cand_images)  # (N_txt, k)
        owned = mine[cand_images]
        keys_t2i = cand_images[owned] * n_txt + captions[owned]  # caption queries' candidates owned here
        return torch.unique(torch.cat([keys_i2t.reshape(-1), keys_t2i]))  # sorted: image-major order

    def _caption_tokens(self, input_ids, mask, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (R, L, D) of the distinct ``captions`` (sorted) and a map caption -> row (N_txt,)."""
        tokens = self._encode_texts(input_ids, mask, captions, tokens=True)
        row = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=self.device)
        row[captions] = torch.arange(captions.shape[0], device=self.device)
        return tokens, row

    def _score_pairs(self, keys: torch.Tensor, images, tokens: torch.Tensor, input_ids, mask) -> dict:
        """ITM logits (P, 2) of the pairs ``keys``, in packed batches with per-image keys/values computed once."""
        n_txt, max_len = input_ids.shape
        pair_image, pair_caption = keys // n_txt, keys % n_txt
        caption_tokens, caption_row = self._caption_tokens(input_ids, mask, torch.unique(pair_caption))

        # Image-major order, images with fewer pairs first (a batch's images with equal counts attend in one call),
        # shorter captions first within an image (a batch is cut to its longest caption).
        length = (mask * torch.arange(1, max_len + 1, device=self.device)).amax(dim=1).clamp_min(1)  # (N_txt,)
        order, window_images, counts = image_major_order(pair_image, length[pair_caption])
        pair_caption = pair_caption[order]
        window_pos = torch.repeat_interleave(torch.arange(counts.shape[0], device=self.device), counts)  # (P,)
        logits = torch.empty(keys.shape[0], 2, dtype=torch.float32, device=self.device)

        window: list[KeyValue] = []
        lo = hi = 0  # the window holds keys/values of window_images[lo:hi]
        for start in range(0, keys.shape[0], self.cfg.rerank_batch_size):
            stop = min(start + self.cfg.rerank_batch_size, keys.shape[0])
            first, last = int(window_pos[start]), int(window_pos[stop - 1]) + 1

            # Slide the window: drop images before this batch, add the new ones (each image exactly once).
            new_kv = None
            if last > hi:
                with self._autocast():
                    new_kv = self.model.fusion.image_kv(tokens[images["local_row"][window_images[hi:last]]])
            window = _slide_window(window, first - lo, new_kv)
            lo, hi = first, max(hi, last)

            # One fusion pass: caption tokens cut to the batch's longest, image keys/values by window position.
            captions = pair_caption[start:stop]
            width = int(length[captions].max())
            text = caption_tokens[caption_row[captions], :width]  # (P, width, D)
            pair_kv = _PairKeyValues(window, window_pos[start:stop] - lo)
            with self._autocast():
                out = self.model.itm_logits(text, mask[captions, :width], image_kv=pair_kv, text_attended=True)
            logits[order[start:stop]] = out.float()
        return {"logits": logits, "captions": int(caption_tokens.shape[0]), "kv_images": hi}

    def _fill_lists(self, keys: torch.Tensor, logits: torch.Tensor, owner, itc: TopK, image_major: bool, n_txt):
        """ITM logits (Q, k, 2) for every entry of a direction's lists, summed over processes."""
        queries = torch.arange(itc.indices.shape[0], device=self.device)[:, None].expand_as(itc.indices)  # (Q, k)
        image, caption = (queries, itc.indices) if image_major else (itc.indices, queries)
        entry_keys = image * n_txt + caption  # (Q, k)
        mine = owner[image] == get_rank()
        filled = torch.zeros(*itc.indices.shape, 2, dtype=torch.float32, device=self.device)  # (Q, k, 2)
        wanted = entry_keys[mine]
        at = torch.searchsorted(keys, wanted).clamp_max(max(keys.shape[0] - 1, 0))
        if wanted.numel() and not bool((keys[at] == wanted).all()):
            raise RuntimeError("re-ranking missed a pair of an image this process owns")
        filled[mine] = logits[at]
        count = all_reduce_sum(mine.to(torch.int32))
        if not bool((count == 1).all()):
            raise RuntimeError("re-ranking lost track of pair ownership (an entry was scored by != 1 process)")
        return all_reduce_sum(filled)

    def _final_scores(self, logits: torch.Tensor, itc_scores: torch.Tensor) -> torch.Tensor:
        """(Q, k) final scores in float64 from ITM logits (Q, k, 2) and ITC similarities (Q, k)."""
        if torch.isnan(logits).any():
            raise FloatingPointError("ITM logits contain NaN: the model's fusion encoder or ITM head is broken")
        logits = logits.double()
        if self.cfg.score == "itm":
            return logits[..., 1]
        if self.cfg.score == "itm_prob":
            return torch.sigmoid(logits[..., 1] - logits[..., 0])  # softmax over 2 classes, class 1
        if self.cfg.score == "itm_logp_plus_itc_logit":
            temperature = float(self.model.temperature())  # clamped, as in training
            return logits.log_softmax(dim=-1)[..., 1] + itc_scores.double() / temperature
        return logits[..., 1] + itc_scores.double()

    def _rerank(self, images, itc_i2t, itc_t2i, input_ids, mask) -> tuple[TopK, TopK, dict[str, int]]:
        n_txt = input_ids.shape[0]
        keys = self._owned_pairs(images, itc_i2t, itc_t2i, n_txt)
        if len(self._tokens) > 1:
            self._tokens = [torch.cat(self._tokens)]  # (N_local, N, C); the batches are released
        tokens = self._tokens[0] if self._tokens else None
        scored = self._score_pairs(keys, images, tokens, input_ids, mask)
        lists = []
        for itc, image_major in ((itc_i2t, True), (itc_t2i, False)):
            logits = self._fill_lists(keys, scored["logits"], images["owner"], itc, image_major, n_txt)
            indices, scores = sort_topk(itc.indices, self._final_scores(logits, itc.scores))
            lists.append(TopK(indices, scores, itc.num_candidates))
        counts = torch.tensor([keys.shape[0], scored["kv_images"], scored["captions"]], device=self.device)
        pairs, kv_images, captions = all_reduce_sum(counts).tolist()
        return lists[0], lists[1], {"pairs_scored": pairs, "kv_images": kv_images, "captions_reencoded": captions}

    # ----- all steps ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute(
        self,
        texts: Sequence[str],
        txt2img: Sequence[int] | np.ndarray,
        img2txt: Sequence[Sequence[int]],
        rerank: bool | None = None,
    ) -> RetrievalResult:
        """Metrics of the images added so far against ``texts``; a collective call on every process."""
        rerank = self.rerank if rerank is None else rerank
        if rerank and not self.rerank:
            raise ValueError("compute(rerank=True) needs RetrievalEvaluator(..., rerank=True) to keep image tokens")
        check_ground_truth(img2txt, txt2img)
        n_img, n_txt = len(img2txt), len(texts)
        if len(txt2img) != n_txt:
            raise ValueError(f"got {n_txt} captions but txt2img has {len(txt2img)} entries")

        # Steps 1-3: gathered features, then ITC candidate lists and exact ITC ranks in both directions.
        images = self._gather_images(n_img)
        input_ids, mask = self._tokenize(texts)
        text_feat = self._gather_text_feats(input_ids, mask)
        txt2img_col = np.asarray(txt2img, dtype=np.int64)[:, None]
        itc_i2t, itc_tr = self._itc_direction(images["feat"], text_feat, img2txt, min(self.cfg.k, n_txt))
        itc_t2i, itc_ir = self._itc_direction(text_feat, images["feat"], txt2img_col, min(self.cfg.k, n_img))
        metrics = metrics_from_ranks(itc_tr.cpu().numpy(), itc_ir.cpu().numpy(), prefix="itc_")

        # Step 4, or the ITC results under the un-prefixed keys too.
        if rerank:
            i2t, t2i, stats = self._rerank(images, itc_i2t, itc_t2i, input_ids, mask)
            tr = self._final_ranks(i2t, img2txt, itc_tr)
            ir = self._final_ranks(t2i, txt2img_col, itc_ir)
        else:
            i2t, t2i, stats, tr, ir = itc_i2t, itc_t2i, {}, itc_tr, itc_ir
        final = metrics_from_ranks(tr.cpu().numpy(), ir.cpu().numpy())
        return RetrievalResult(
            metrics={**final, **metrics},
            i2t=_to_numpy(i2t),
            t2i=_to_numpy(t2i),
            itc_i2t=_to_numpy(itc_i2t),
            itc_t2i=_to_numpy(itc_t2i),
            tr_ranks=tr.cpu().numpy(),
            ir_ranks=ir.cpu().numpy(),
            itc_tr_ranks=itc_tr.cpu().numpy(),
            itc_ir_ranks=itc_ir.cpu().numpy(),
            reranked=rerank,
            stats=stats,
        )

    def _final_ranks(self, lists: TopK, positives, itc_ranks: torch.Tensor) -> torch.Tensor:
        # A ground truth outside the re-ranked k keeps its ITC rank (> k), see the module docstring.
        pos, valid = pad_positives(positives, device=self.device)
        return topk_ranks(lists.indices, pos, valid, fallback=itc_ranks)


def _slide_window(window: list[KeyValue], drop: int, new_kv: list[KeyValue] | None) -> list[KeyValue]:
    """Per-layer keys/values (W, H, N, d) without their first ``drop`` images, followed by ``new_kv``."""
    kept = [(k[drop:], v[drop:]) for k, v in window]
    if new_kv is None:
        return kept
    new_kv = [(k.contiguous(), v.contiguous()) for k, v in new_kv]  # once per image; batches slice it
    if not kept:
        return new_kv
    return [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(kept, new_kv)]  # (W', H, N, d)


def _to_numpy(topk: TopK) -> TopK:
    return TopK(topk.indices.cpu().numpy(), topk.scores.cpu().numpy(), topk.num_candidates)


def _image_batches(image_loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, index) from batches that are dicts with ``image`` and ``index`` or (image, index) pairs."""
    for batch in image_loader:
        if isinstance(batch, dict):
            if "image" not in batch or "index" not in batch:
                raise ValueError(f"image batches need 'image' and 'index' entries; got keys {sorted(batch)}")
            yield batch["image"], batch["index"]
        else:
            image, index = batch[0], batch[1]
            yield image, index


def run_retrieval(
    model: nn.Module,
    image_loader: Iterable,
    texts: Sequence[str],
    txt2img: Sequence[int] | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    cfg: RetrievalConfig | None = None,
    rerank: bool = True,
) -> RetrievalResult:
    """Full result (metrics, top-k lists, ranks); see :func:`evaluate_retrieval`."""
    evaluator = RetrievalEvaluator(model, cfg, rerank=rerank)
    for image, index in _image_batches(image_loader):
        evaluator.add_images(image, index)
    return evaluator.compute(texts, txt2img, img2txt, rerank=rerank)


def evaluate_retrieval(
    model: nn.Module,
    image_loader: Iterable,
    texts: Sequence[str],
    txt2img: Sequence[int] | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    cfg: RetrievalConfig | None = None,
    rerank: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` (on its device, in eval mode) as a flat dict.

    ``image_loader`` yields this process's image batches: dicts with ``image`` (B, 3, H, W) and ``index`` (B,),
    the position of each image in ``img2txt`` (repeats across processes are fine). ``texts``, ``txt2img`` and
    ``img2txt`` describe the whole set on every process. Collective under ``torch.distributed``: every process
    calls it and gets the same dict. Keys: ``tr@1/5/10``, ``ir@1/5/10``, ``tr_mean``, ``ir_mean``, ``r_mean``,
    ``tr/ir_mean_rank``, ``tr/ir_median_rank`` for the re-ranked scores, and the same prefixed ``itc_`` for
    ITC alone. With ``rerank=False`` no ITM is run and the un-prefixed keys equal their ``itc_`` twins.
    """
    return run_retrieval(model, image_loader, texts, txt2img, img2txt, cfg, rerank).metrics
