"""The swap test: every one-attribute swap is scored against its own scene's true caption, by both heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vlp.data.synthetic import SWAPPABLE, SyntheticScenes
from vlp.eval.swaps import format_swap_test, swap_test
from vlp.model.tokenizer import builtin_tokenizer


class ScriptedModel(nn.Module):
    """Scores read from a caption -> (ITC score, ITM logit) table, whatever the image: an oracle for the test."""

    def __init__(self, scores: dict[str, tuple[float, float]]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the test its device
        self.tokenizer = builtin_tokenizer()
        self.cfg = type("Cfg", (), {"text_encoder": type("Text", (), {"max_length": 40})})()
        self.scores = scores

    def encode_image(self, image):
        ones = torch.ones(image.shape[0], 1)
        return ones[:, :, None], ones  # tokens (B, 1, 1), feature (B, 1)

    def encode_text(self, input_ids, mask):
        captions = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        table = torch.tensor([self.scores[c] for c in captions])  # (C, 2)
        return table[:, None, :], table[:, :1]  # ITM reads the tokens, ITC the feature

    def itm_logits(self, text_embeds, mask, image_embeds=None):
        return torch.stack([torch.zeros(text_embeds.shape[0]), text_embeds[:, 0, 1]], dim=1)  # (C, 2)


def test_each_head_wins_exactly_where_the_true_caption_scores_higher():
    scenes = SyntheticScenes(0, "val", 20, image_size=16)
    # ITC: the true caption 1, every swap 0 (always right). ITM: true 0.5, colour swaps 1 (always wrong there),
    # relation swaps 0.5 (a tie, which is not a win), other swaps 0.
    scores, expected_counts = {}, dict.fromkeys(SWAPPABLE, 0)
    for i in range(len(scenes)):
        scene = scenes.scene(i)
        scores[scene.captions(1)[0]] = (1.0, 0.5)
        for attribute in SWAPPABLE:
            swapped = scene.swap(attribute)
            if swapped.canonical() != scene.canonical():
                itm = {"colour": 1.0, "relation": 0.5}.get(attribute, 0.0)
                scores[swapped.captions(1)[0]] = (0.0, itm)
                expected_counts[attribute] += 1

    result = swap_test(ScriptedModel(scores), scenes, lambda image: torch.zeros(3, 16, 16), batch_size=7)
    assert {a: result[a]["count"] for a in SWAPPABLE} == expected_counts
    assert expected_counts["relation"] == len(scenes) and expected_counts["size"] < len(scenes)
    assert all(result[a]["itc"] == 1.0 for a in SWAPPABLE)
    assert result["colour"]["itm"] == 0.0 and result["relation"]["itm"] == 0.0
    assert all(result[a]["itm"] == 1.0 for a in ("shape", "size", "count", "objects"))
    assert result["mean"]["itm"] == pytest.approx(4 / 6)
    table = format_swap_test(result)
    assert "relation" in table.splitlines()[0] and table.splitlines()[2].startswith("ITM")
