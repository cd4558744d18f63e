"""Swap test on the synthetic scenes: is the true caption scored above each one-attribute swap of it?

Recall over a gallery of random scenes rarely puts a scene next to its own swap, so it says little about binding
("red circle, blue square" against "blue circle, red square") or relations ("left of" against "right of"). This
test asks it directly, as compositionality benchmarks do: for every scene and every attribute whose swap states
other facts (:meth:`Scene.swap`), both heads score the image against the true caption and against the swapped
one, and a head wins when the true caption scores strictly higher. Chance is 0.5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlp.data.synthetic import SWAPPABLE, SyntheticScenes

HEADS = ("itc", "itm")


@torch.no_grad()
def swap_test(model, scenes: SyntheticScenes, transform: Callable, batch_size: int = 64) -> dict[str, dict]:
    """Per attribute of :data:`SWAPPABLE`: ``count`` (scenes where the swap changes the facts) and the fraction of
    them where ITC (cosine) and ITM (match logit) score the true caption higher; ``mean`` averages attributes."""
    model.eval()
    device = next(model.parameters()).device
    wins = torch.zeros(len(SWAPPABLE), len(HEADS), dtype=torch.long)
    counts = torch.zeros(len(SWAPPABLE), dtype=torch.long)
    for start in range(0, len(scenes), batch_size):
        indices = range(start, min(start + batch_size, len(scenes)))
        batch_wins, batch_counts = _score_batch(model, scenes, indices, transform, device)
        wins += batch_wins
        counts += batch_counts

    # Fractions per attribute; attributes that never changed the facts are left out of the mean.
    result = {}
    for a, attribute in enumerate(SWAPPABLE):
        n = int(counts[a])
        result[attribute] = {
            "count": n,
            **{h: wins[a, j].item() / n if n else float("nan") for j, h in enumerate(HEADS)},
        }
    seen = [result[a] for a in SWAPPABLE if result[a]["count"]]
    result["mean"] = {"count": sum(r["count"] for r in seen), **{h: sum(r[h] for r in seen) / len(seen) for h in HEADS}}
    return result


def _score_batch(model, scenes, indices, transform, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Captions (first template): each scene's true caption, then those of its swaps that state other facts.
    captions, owner, attribute = [], [], []
    for row, index in enumerate(indices):
        scene = scenes.scene(index)
        captions.append(scene.captions(1)[0])
        owner.append(row)
        attribute.append(-1)
        for a, name in enumerate(SWAPPABLE):
            swapped = scene.swap(name)
            if swapped.canonical() != scene.canonical():
                captions.append(swapped.captions(1)[0])
                owner.append(row)
                attribute.append(a)
    owner_t, attribute_t = torch.tensor(owner, device=device), torch.tensor(attribute, device=device)

    # Both heads score every (image, caption) pair of a scene.
    images = torch.stack([transform(scenes.image(i)) for i in indices]).to(device)  # (S, 3, H, W)
    image_embeds, image_feat = model.encode_image(images)
    tokens = model.tokenizer(
        captions, padding=True, truncation=True, max_length=model.cfg.text_encoder.max_length, return_tensors="pt"
    )
    input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    text_embeds, text_feat = model.encode_text(input_ids, mask)
    itc = (image_feat[owner_t].float() * text_feat.float()).sum(dim=-1)  # (C,)
    itm = model.itm_logits(text_embeds, mask, image_embeds=image_embeds[owner_t])[:, 1].float()  # (C,)
    scores = torch.stack([itc, itm], dim=1)  # (C, 2)

    # Each swap against its own scene's true caption.
    true_row = torch.nonzero(attribute_t < 0).squeeze(1)  # (S,): caption index of each scene's true caption
    swaps = attribute_t >= 0
    won = scores[true_row[owner_t[swaps]]] > scores[swaps]  # (N_swaps, 2)
    wins = torch.zeros(len(SWAPPABLE), len(HEADS), dtype=torch.long, device=device)
    wins.index_add_(0, attribute_t[swaps], won.long())
    counts = torch.bincount(attribute_t[swaps], minlength=len(SWAPPABLE))
    return wins.cpu(), counts.cpu()


def format_swap_test(result: dict[str, dict]) -> str:
    """A plain-text table: one column per attribute, one row per head."""
    names = [*SWAPPABLE, "mean"]
    lines = [f"{'':<16}" + "".join(f"{name:>10}" for name in names)]
    for head in HEADS:
        lines.append(f"{head.upper():<16}" + "".join(f"{result[name][head]:10.3f}" for name in names))
    lines.append(f"{'swaps':<16}" + "".join(f"{result[name]['count']:10d}" for name in names))
    return "\n".join(lines)
