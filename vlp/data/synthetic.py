"""Synthetic compositional image-caption data: the built-in default dataset (no download).

Each scene holds two object groups A and B and a spatial relation between them. A group has a colour, a shape, a
size and a count (1-3 identical objects), e.g. "two small red circles left of a large blue square". Every
attribute is drawn independently (only the two colours must differ), so swapping any attribute between A and B,
or flipping the relation, describes another scene of the same distribution: a plausible hard negative for ITM.

Images are drawn with PIL on the fly from ``(seed, split, index)``: the same triple always gives the same scene,
image and captions, for any dataset size. Group A sits in the half of the canvas that the relation names and B in
the other half, so "left of" is true of every A object against every B object. Captions come from
:data:`TEMPLATES`: paraphrases stating the same facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Half-extent of one object as a fraction of the canvas side.
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}
COUNTS = (1, 2, 3)
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SWAPPABLE = ("colour", "shape", "size", "count", "relation", "objects")

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_LONG_RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# About 35k distinct scenes exist (30 colour pairs x 16 shape pairs x 4 size pairs x 9 count pairs x 4 relations,
# halved by the A/B symmetry); unique evaluation splits stay well below that.
MAX_UNIQUE_SCENES = 10000
# A training family holds a scene and up to five one-attribute swaps of it (see scene_family).
MAX_FAMILY_SIZE = 6


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` identical objects of one colour, shape and size."""

    colour: str
    shape: str
    size: str
    count: int

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{_NUMBER_WORDS[self.count]} {self.size} {self.colour} {noun}"

    def pronoun(self) -> str:
        return "its" if self.count == 1 else "their"


@dataclass(frozen=True)
class Scene:
    """Group ``a`` stands in ``relation`` to group ``b`` (e.g. a "left of" b)."""

    a: ObjectGroup
    relation: str
    b: ObjectGroup

    def captions(self, n: int | None = None) -> list[str]:
        """The first ``n`` paraphrases, all of them by default (all state the same facts)."""
        return [template(self) for template in TEMPLATES[:n]]

    def canonical(self) -> tuple:
        """Facts with the A/B order normalised: "A left of B" and "B right of A" are one scene."""
        forward = (self.a, self.relation, self.b)
        backward = (self.b, INVERSE[self.relation], self.a)
        return min(forward, backward, key=repr)

    def swap(self, attribute: str) -> Scene:
        """The hard-negative scene with ``attribute`` exchanged between A and B (or the relation flipped)."""
        if attribute == "relation":
            return replace(self, relation=INVERSE[self.relation])
        if attribute == "objects":
            return replace(self, a=self.b, b=self.a)
        if attribute not in ("colour", "shape", "size", "count"):
            raise ValueError(f"attribute must be one of {SWAPPABLE} (got {attribute!r})")
        a_value, b_value = getattr(self.a, attribute), getattr(self.b, attribute)
        return replace(self, a=replace(self.a, **{attribute: b_value}), b=replace(self.b, **{attribute: a_value}))


def _there_is(s: Scene) -> str:
    verb = "is" if s.a.count == 1 else "are"
    return f"there {verb} {s.a.phrase()} {_LONG_RELATION[s.relation]} {s.b.phrase()}"


def _with_pronoun(s: Scene) -> str:
    # "B with A to its left" states A left of B; above/below read "above it"/"below them".
    obj = "it" if s.b.count == 1 else "them"
    side = {"left of": "to {p} left", "right of": "to {p} right", "above": "above {o}", "below": "below {o}"}
    return f"{s.b.phrase()} with {s.a.phrase()} " + side[s.relation].format(p=s.b.pronoun(), o=obj)


TEMPLATES: tuple[Callable[[Scene], str], ...] = (
    lambda s: f"{s.a.phrase()} {s.relation} {s.b.phrase()}",
    _there_is,
    lambda s: f"{s.b.phrase()} {INVERSE[s.relation]} {s.a.phrase()}",
    lambda s: f"an image of {s.a.phrase()} {_LONG_RELATION[s.relation]} {s.b.phrase()}",
    _with_pronoun,
)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw every attribute independently; only the two colours must differ (so colour names identify A and B)."""
    colours = list(COLOURS)
    ca, cb = rng.choice(len(colours), size=2, replace=False)

    def group(colour_index: int) -> ObjectGroup:
        return ObjectGroup(
            colour=colours[colour_index],
            shape=SHAPES[rng.integers(len(SHAPES))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            count=COUNTS[rng.integers(len(COUNTS))],
        )

    a = group(ca)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return Scene(a=a, relation=relation, b=group(cb))


def scene_family(rng: np.random.Generator, size: int) -> list[Scene]:
    """A sampled scene followed by ``size - 1`` distinct scenes that each swap one attribute of it (hard negatives).

    Only swaps that change the facts count (swapping two equal sizes changes nothing, and exchanging the objects
    states the same facts as flipping the relation); with too few of them, fresh scenes fill the family.
    """
    base = sample_scene(rng)
    family, seen = [base], {base.canonical()}
    for attribute in rng.permutation(SWAPPABLE):
        swapped = base.swap(str(attribute))
        if len(family) < size and swapped.canonical() not in seen:
            family.append(swapped)
            seen.add(swapped.canonical())
    while len(family) < size:
        family.append(sample_scene(rng))
    return family


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Independent deterministic stream per (seed, split, index); stream 0 = facts, 1 = layout and noise."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, stream])


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as a size x size RGB image; ``rng`` decides positions, jitter and noise."""
    # Draw at twice the resolution and box-filter down: smooth edges without an anti-aliasing library.
    canvas = 2 * size
    background = int(rng.integers(15, 70))
    img = Image.new("RGB", (canvas, canvas), (background,) * 3)
    draw = ImageDraw.Draw(img)

    # A occupies the half named by the relation, B the opposite half.
    half = canvas / 2
    regions = {
        "left of": ((0, 0, half, canvas), (half, 0, canvas, canvas)),
        "right of": ((half, 0, canvas, canvas), (0, 0, half, canvas)),
        "above": ((0, 0, canvas, half), (0, half, canvas, canvas)),
        "below": ((0, half, canvas, canvas), (0, 0, canvas, half)),
    }[scene.relation]
    for group, region in zip((scene.a, scene.b), regions):
        for cx, cy in _group_centres(group, region, canvas, rng):
            colour = np.clip(np.array(COLOURS[group.colour]) + rng.integers(-12, 13, size=3), 0, 255)
            _draw_shape(draw, group.shape, cx, cy, SIZES[group.size] * canvas, tuple(int(c) for c in colour))

    # Down-sample and add mild sensor-like noise so pixels are not a lookup table.
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.int16)
    noisy = small + rng.normal(0.0, 4.0, size=small.shape).round().astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def _group_centres(group: ObjectGroup, region: tuple, canvas: int, rng: np.random.Generator) -> list[tuple]:
    """Centres of the group's objects: one slot each along the region's long axis, jittered inside the slot."""
    x0, y0, x1, y1 = region
    radius = SIZES[group.size] * canvas
    margin = 1.0
    horizontal = (x1 - x0) >= (y1 - y0)
    long0, long1, cross0, cross1 = (x0, x1, y0, y1) if horizontal else (y0, y1, x0, x1)
    slot = (long1 - long0) / group.count
    centres = []
    for k in range(group.count):
        lo, hi = long0 + k * slot + radius + margin, long0 + (k + 1) * slot - radius - margin
        along = rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2
        across = rng.uniform(cross0 + radius + margin, cross1 - radius - margin)
        centres.append((along, across) if horizontal else (across, along))
    return centres


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        s = 0.88 * r  # a square of equal half-extent looks larger than the circle; shrink to similar area
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class SyntheticScenes:
    """Scenes of one split. Training scenes are drawn on demand (any size, O(1) memory); evaluation scenes are
    drawn up front and kept unique, so no two gallery images share a caption (retrieval stays well defined).

    With ``family_size`` g > 1, scenes drawn on demand come in families of g consecutive indices (a scene and its
    one-attribute swaps, :func:`scene_family`); a sampler that keeps each family in one batch
    (``ShardedSampler(group_size=g)``) then puts compositional hard negatives in every batch.
    """

    def __init__(
        self,
        seed: int,
        split: str,
        size: int,
        image_size: int = 64,
        unique: bool | None = None,
        family_size: int = 1,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {tuple(_SPLIT_CODES)} (got {split!r})")
        if not 1 <= family_size <= MAX_FAMILY_SIZE:
            raise ValueError(f"family_size must be between 1 and {MAX_FAMILY_SIZE} (got {family_size})")
        self.seed, self.split, self.size, self.image_size = seed, split, size, image_size
        self.family_size = family_size
        # Uniqueness needs rejection sampling, which stalls as the split nears the number of distinct scenes.
        unique = (split != "train" and size <= MAX_UNIQUE_SCENES) if unique is None else unique
        if unique and size > MAX_UNIQUE_SCENES:
            raise ValueError(f"at most {MAX_UNIQUE_SCENES} unique synthetic scenes per split (asked for {size})")
        self._scenes = self._unique_scenes() if unique else None

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if self._scenes is not None:
            return self._scenes[index]
        if self.family_size == 1:
            return sample_scene(scene_rng(self.seed, self.split, index))
        # Families: member m of the family starting at ``base`` is the base scene with one attribute swapped.
        base, member = index - index % self.family_size, index % self.family_size
        return scene_family(scene_rng(self.seed, self.split, base), self.family_size)[member]

    def image(self, index: int) -> Image.Image:
        return render_scene(self.scene(index), self.image_size, scene_rng(self.seed, self.split, index, stream=1))

    def _unique_scenes(self) -> list[Scene]:
        # Redraw (with a fresh stream per attempt) whenever a scene repeats an earlier one's facts.
        seen: set[tuple] = set()
        scenes = []
        for index in range(self.size):
            rng = scene_rng(self.seed, self.split, index)
            scene = sample_scene(rng)
            while scene.canonical() in seen:
                scene = sample_scene(rng)
            seen.add(scene.canonical())
            scenes.append(scene)
        return scenes
