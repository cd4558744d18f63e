"""Synthetic compositional data: determinism, caption facts, hard negatives, drawn layout."""

from __future__ import annotations

import numpy as np
import pytest

from vlp.data.synthetic import COLOURS, INVERSE, SWAPPABLE, TEMPLATES, ObjectGroup, Scene, SyntheticScenes


def test_same_seed_same_scene_and_pixels():
    a, b = SyntheticScenes(7, "train", 50), SyntheticScenes(7, "train", 50)
    for i in (0, 13, 49):
        assert a.scene(i) == b.scene(i)
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))


def test_seed_and_split_change_the_data():
    base = SyntheticScenes(0, "train", 20)
    other_seed = SyntheticScenes(1, "train", 20)
    val = SyntheticScenes(0, "val", 20)
    assert [base.scene(i) for i in range(20)] != [other_seed.scene(i) for i in range(20)]
    assert [base.scene(i) for i in range(20)] != [val.scene(i) for i in range(20)]


def test_any_size_is_cheap_and_indexable():
    huge = SyntheticScenes(0, "train", 10**9)
    assert len(huge) == 10**9
    assert huge.image(10**9 - 1).size == (64, 64)


def test_five_paraphrases_state_the_same_facts():
    scene = Scene(ObjectGroup("red", "circle", "small", 1), "left of", ObjectGroup("blue", "square", "large", 2))
    assert scene.captions() == [
        "a small red circle left of two large blue squares",
        "there is a small red circle to the left of two large blue squares",
        "two large blue squares right of a small red circle",
        "an image of a small red circle to the left of two large blue squares",
        "two large blue squares with a small red circle to their left",
    ]
    assert len(TEMPLATES) == 5


@pytest.mark.parametrize("attribute", SWAPPABLE)
def test_swapped_caption_is_a_different_valid_scene(attribute):
    # Pick a scene whose two groups differ in every attribute, so every swap changes the facts.
    scene = Scene(ObjectGroup("red", "circle", "small", 1), "above", ObjectGroup("green", "triangle", "large", 3))
    swapped = scene.swap(attribute)
    assert swapped.canonical() != scene.canonical()
    assert swapped.captions(1) != scene.captions(1)
    # Still in the distribution: known values, two distinct colours.
    for group in (swapped.a, swapped.b):
        assert group.colour in COLOURS and group.count in (1, 2, 3)
    assert swapped.a.colour != swapped.b.colour
    assert swapped.relation in INVERSE


def test_swap_relation_and_objects_are_mirror_images():
    scene = Scene(ObjectGroup("red", "circle", "small", 1), "left of", ObjectGroup("blue", "square", "large", 1))
    assert scene.swap("relation").captions(1) == ["a small red circle right of a large blue square"]
    assert scene.swap("objects").captions(1) == ["a large blue square left of a small red circle"]
    # "A left of B" and "B right of A" are the same scene.
    assert scene.canonical() == Scene(scene.b, "right of", scene.a).canonical()


def test_eval_split_has_unique_scenes():
    scenes = SyntheticScenes(0, "val", 600)
    assert len({scenes.scene(i).canonical() for i in range(600)}) == 600


def _colour_mask(img: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(COLOURS[colour])).sum(axis=-1) < 70


@pytest.mark.parametrize("index", range(12))
def test_drawn_layout_matches_the_relation(index):
    scenes = SyntheticScenes(3, "train", 100, image_size=64)
    scene, img = scenes.scene(index), np.asarray(scenes.image(index))
    ys_a, xs_a = np.nonzero(_colour_mask(img, scene.a.colour))
    ys_b, xs_b = np.nonzero(_colour_mask(img, scene.b.colour))
    assert len(xs_a) > 10 and len(xs_b) > 10  # both groups are visible
    coord_a, coord_b = (xs_a, xs_b) if scene.relation in ("left of", "right of") else (ys_a, ys_b)
    # Each group lies entirely in its half: A before B for left-of/above, after it for right-of/below.
    if scene.relation in ("left of", "above"):
        assert coord_a.max() < coord_b.min()
    else:
        assert coord_a.min() > coord_b.max()


def test_large_objects_cover_more_pixels_than_small_ones():
    scenes = SyntheticScenes(5, "train", 400)
    ratios = []
    for i in range(400):
        s = scenes.scene(i)
        if s.a.size != s.b.size and s.a.count == s.b.count and s.a.shape == s.b.shape:
            img = np.asarray(scenes.image(i))
            large, small = (s.a, s.b) if s.a.size == "large" else (s.b, s.a)
            ratios.append(_colour_mask(img, large.colour).sum() / max(1, _colour_mask(img, small.colour).sum()))
    assert len(ratios) >= 3
    assert min(ratios) > 2.0


def test_training_families_are_a_scene_and_its_one_attribute_swaps():
    scenes = SyntheticScenes(0, "train", 400, family_size=4)
    swaps_seen = set()
    for base in range(0, 400, 4):
        family = [scenes.scene(base + m) for m in range(4)]
        # Four different scenes (no false negatives inside a batch); the same family from any member's index.
        assert len({s.canonical() for s in family}) == 4
        assert scenes.scene(base + 3) == SyntheticScenes(0, "train", 400, family_size=4).scene(base + 3)
        # Members after the first swap one attribute of it (colour and relation always can; shape, size and count
        # only where the groups differ); fresh scenes fill in where fewer swaps exist.
        distinct_swaps = {family[0].swap(a).canonical() for a in SWAPPABLE} - {family[0].canonical()}
        for position, member in enumerate(family[1:], start=1):
            matches = [a for a in SWAPPABLE if family[0].swap(a).canonical() == member.canonical()]
            assert bool(matches) == (position <= len(distinct_swaps)), (family[0], member)
            swaps_seen.update(matches)
    assert swaps_seen == set(SWAPPABLE)


def test_family_size_is_checked():
    with pytest.raises(ValueError, match="family_size"):
        SyntheticScenes(0, "train", 10, family_size=7)
