"""The procedural shapes world: grammar, sampling, rendering, vectorised tokenisation."""

import pytest
import torch

from catprune.models.shapes.tokenizer import ShapesTokenizer
from catprune.models.shapes.world import (
    CELLS,
    COLOURS,
    IMAGE_SIZE,
    VOCABULARY,
    ShapeObject,
    caption_for,
    cell_centre,
    parse_caption,
    random_captions,
    render_captions,
    render_scenes,
    sample_scenes,
    scenes_from_captions,
)


def test_caption_round_trip_through_parser():
    captions = random_captions(200, seed=3)
    for caption in captions:
        objects = parse_caption(caption)
        assert 1 <= len(objects) <= 2
        assert caption_for(objects) == caption
        assert len({o.cell for o in objects}) == len(objects)
    counts = [len(parse_caption(c)) for c in captions]
    assert 70 <= counts.count(1) <= 130  # 1 or 2 objects with probability 1/2 each


def test_captions_use_only_the_vocabulary_and_are_seeded():
    words = {w for c in random_captions(300, seed=1) for w in c.split()}
    assert words <= set(VOCABULARY)
    assert random_captions(10, seed=5) == random_captions(10, seed=5)
    assert random_captions(10, seed=5) != random_captions(10, seed=6)


@pytest.mark.parametrize(
    "caption",
    [
        "a small red dragon at the top",
        "a red circle at the top",
        "a small red circle at the middle",
        "a small red circle at the top and a large blue square at the top",
        "",
    ],
)
def test_parse_caption_rejects_captions_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


def test_render_background_and_object_colours():
    caption = "a large red square at the center"
    scenes = scenes_from_captions([caption], generator=0)
    image = render_scenes(scenes)[0]  # (3, H, W)
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # The object centre is within 4% of the side of the cell centre, so the cell centre pixel is pure red.
    assert torch.allclose(image[:, 64, 64], torch.tensor(COLOURS["red"]), atol=1e-6)
    # Corners are background: light tones, every channel in [0.8, 1].
    corner = image[:, 0, 0]
    assert bool((corner >= 0.8).all() and (corner <= 1.0).all())
    top, bottom = scenes.background[0]
    assert torch.allclose(image[:, 0, 0], top + (bottom - top) * 0.5 / IMAGE_SIZE, atol=1e-6)


def test_object_sizes_match_the_spec():
    # Jitter is random; measure the drawn area against the analytic area of each shape.
    for shape, area_per_r2 in (("circle", 3.14159), ("square", 4 * 0.85**2), ("triangle", 0.5 * 2.2 * 1.7)):
        for size, r in (("small", 0.11), ("large", 0.19)):
            scenes = scenes_from_captions([f"a {size} black {shape} at the center"], generator=1)
            image = render_scenes(scenes)[0]
            top, bottom = scenes.background[0, :, 0]  # red channel of the gradient's two tones
            ramp = (torch.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE
            background = (top + (bottom - top) * ramp).view(-1, 1)  # (H, 1)
            coverage = (background - image[0]) / (background - 0.05)  # alpha of the black object, (H, W)
            drawn = float(coverage.sum()) / IMAGE_SIZE**2
            assert drawn == pytest.approx(area_per_r2 * r * r, rel=0.01), (shape, size)


def test_triangle_points_up_and_jitter_is_bounded():
    scenes = scenes_from_captions(["a large black triangle at the center"] * 16, generator=2)
    images = render_scenes(scenes)
    dark = images[:, 0] < 0.5  # (B, H, W)
    widths = dark.sum(dim=2).float()  # (B, H) per-row width
    rows = dark.any(dim=2)
    for i in range(16):
        ys = rows[i].nonzero().squeeze(1)
        top, bottom = int(ys.min()), int(ys.max())
        assert widths[i, top + 3] < widths[i, bottom - 3]  # narrow apex on top, wide base at the bottom
    assert float(scenes.offset.norm(dim=-1).max()) <= 0.04 + 1e-6


def test_second_object_is_drawn_on_top():
    caption = "a large red square at the center and a small blue circle at the right"
    scenes = scenes_from_captions([caption], generator=0)
    scenes.offset.zero_()
    scenes.cell[0, 1] = CELLS.index("right")
    image = render_scenes(scenes)[0]
    x, y = cell_centre("right")
    px = image[:, int(y * IMAGE_SIZE), int(x * IMAGE_SIZE)]
    assert torch.allclose(px, torch.tensor(COLOURS["blue"]), atol=1e-6)


def test_edges_are_anti_aliased():
    image = render_captions(["a large black circle at the center"], seed=0)[0]
    values = image[0].flatten()
    partial = ((values > 0.1) & (values < 0.75)).sum()
    assert int(partial) > 50  # a ring of intermediate values around the circle


def test_sample_scenes_excludes_captions_and_keys_identify_captions():
    held_out = random_captions(50, seed=9)
    scenes = sample_scenes(400, generator=4, exclude_captions=held_out)
    assert not set(scenes.captions) & set(held_out)
    same = scenes_from_captions(scenes.captions, generator=7)
    assert torch.equal(same.keys(), scenes.keys())
    distinct = len(set(scenes.captions))
    assert len(set(scenes.keys().tolist())) == distinct


def test_vectorised_tokenisation_matches_the_tokenizer():
    tok = ShapesTokenizer()
    scenes = sample_scenes(300, generator=11)
    drop = torch.rand(300, generator=torch.Generator().manual_seed(0)) < 0.3
    fast = tok.encode_scenes(scenes, drop=drop)
    slow = tok(["" if d else c for d, c in zip(drop.tolist(), scenes.captions, strict=True)])
    assert torch.equal(fast["input_ids"], slow["input_ids"])
    assert torch.equal(fast["attention_mask"], slow["attention_mask"])


def test_shape_object_phrase():
    assert ShapeObject("square", "large", "cyan", "bottom right").phrase() == "a large cyan square at the bottom right"
