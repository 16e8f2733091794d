"""The embedded scenes model: world, atlas, tokenizer, pipeline interface, input errors, identity checker, and a CPU
check of the shipped weights."""

import json
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import catprune
from catprune.evaluation.identity import (
    HELD_OUT_CAPTION_SEED,
    HELD_OUT_NUM_CAPTIONS,
    QUICK_CHECK_CAPTIONS,
    check_identity,
    fit_background,
    held_out_captions,
)
from catprune.models.scenes import (
    OBJECT_NAMES,
    VOCABULARY,
    ScenesPipeline,
    ScenesTokenizer,
    build_random_scenes_pipeline,
    caption_for,
    load_atlas,
    load_scenes_pipeline,
    parse_caption,
    random_captions,
    render_captions,
    render_scenes,
    sample_scenes,
    save_scenes_weights,
    scenes_from_captions,
)
from catprune.models.scenes.loading import WEIGHTS_DIR
from catprune.models.scenes.world import ATLAS_DIR, GLYPH_SIDE, JITTER, glyph_origin, render_background

CAPTION = "an owl at the top left and a delivery truck at the center"


@pytest.fixture(scope="module")
def tiny():
    pipe = build_random_scenes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_object_names_are_plain_unicode_names():
    import unicodedata

    atlas = load_atlas()
    assert len(OBJECT_NAMES) >= 150 and len(set(OBJECT_NAMES)) == len(OBJECT_NAMES)
    assert {"hamburger", "hippopotamus", "delivery truck"} <= set(OBJECT_NAMES)
    for name, code in zip(OBJECT_NAMES, atlas.code_points, strict=True):
        assert unicodedata.name(chr(int(code[2:], 16))).lower() == name
        assert re.fullmatch(r"[a-z]+( [a-z]+){0,2}", name)
        assert set(name.split()) <= set(VOCABULARY)
    assert atlas.meta["licence"] == "OFL-1.1" and atlas.meta["font_version"].startswith("Version")
    assert (ATLAS_DIR / "OFL.txt").read_text().count("SIL OPEN FONT LICENSE Version 1.1") == 1
    assert tuple(atlas.rgba.shape) == (len(OBJECT_NAMES), 4, 64, 64)


def test_captions_parse_and_round_trip():
    pairs = parse_caption(CAPTION)
    assert pairs == [("owl", "top left"), ("delivery truck", "center")]
    assert caption_for(pairs) == CAPTION
    for caption in random_captions(50, seed=1):
        assert caption_for(parse_caption(caption)) == caption
    for bad in ("a owl at the center", "an owl at the middle", "a dragon fruit at the top", "a cat at the top and "
                "a dog at the top"):  # fmt: skip
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)


def test_world_follows_its_rules():
    scenes = sample_scenes(400, generator=3)
    counts = scenes.present.sum(dim=1)
    assert counts.min() == 1 and counts.max() == 3 and set(counts.tolist()) == {1, 2, 3}
    for row in range(400):
        cells = scenes.cell[row][scenes.present[row]].tolist()
        objects = scenes.obj[row][scenes.present[row]].tolist()
        assert len(set(cells)) == len(cells) and len(set(objects)) == len(objects)
    assert scenes.side.min() >= GLYPH_SIDE - 2 and scenes.side.max() <= GLYPH_SIDE + 2
    assert scenes.dy.abs().max() == JITTER and scenes.dx.abs().max() == JITTER
    lo, hi = torch.cat([scenes.colour0, scenes.colour1]).aminmax()
    assert lo >= 0.2 and hi <= 0.95
    images = render_scenes(sample_scenes(8, generator=3))
    assert tuple(images.shape[1:]) == (3, 128, 128) and images.min() >= 0 and images.max() <= 1
    # a 38 px glyph shifted 3 px outwards reaches at most 1 px past its cell (42.67 px wide)
    y0, x0 = glyph_origin(scenes.cell, scenes.side, scenes.dy, scenes.dx)
    for start, centre in ((y0, (scenes.cell // 3 + 0.5) * 128 / 3), (x0, (scenes.cell % 3 + 0.5) * 128 / 3)):
        assert (start - (centre - 128 / 6)).min() >= -1 and (start + scenes.side - (centre + 128 / 6)).max() <= 1


def test_background_is_a_linear_gradient_between_the_two_colours():
    scenes = sample_scenes(6, generator=4)
    bg = render_background(scenes)  # (B, 3, 128, 128)
    corners = bg[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (B, 3, 4)
    for colour in (scenes.colour0, scenes.colour1):  # each colour sits exactly at one corner
        distance = (corners - colour.view(6, 3, 1)).abs().amax(dim=1).amin(dim=1)  # (B,)
        assert distance.max() < 1e-4
    assert torch.allclose(fit_background(bg), bg, atol=1e-3)


def test_encode_scenes_matches_the_tokenizer():
    tok = ScenesTokenizer()
    scenes = sample_scenes(64, generator=5)
    drop = torch.arange(64) % 5 == 0
    fast = tok.encode_scenes(scenes, drop=drop)
    captions = ["" if d else c for c, d in zip(scenes.captions, drop.tolist(), strict=True)]
    slow = tok(captions)
    assert torch.equal(fast["input_ids"], slow["input_ids"])
    assert torch.equal(fast["attention_mask"], slow["attention_mask"])
    assert tok.decode(tok(CAPTION)["input_ids"][0]) == CAPTION


def test_held_out_split_is_fixed_and_kept_out_of_training():
    held = held_out_captions()
    assert len(held) == HELD_OUT_NUM_CAPTIONS == 200 and held == random_captions(200, seed=HELD_OUT_CAPTION_SEED)
    keys = scenes_from_captions(held + list(QUICK_CHECK_CAPTIONS)).keys()
    # the key ignores caption order (the training script compares scenes by key)
    swapped = [" and ".join(reversed(c.split(" and "))) for c in held]
    assert torch.equal(scenes_from_captions(swapped).keys(), keys[:200])
    # one key per distinct set of (object, cell) pairs
    captions = held + list(QUICK_CHECK_CAPTIONS)
    assert len(set(keys.tolist())) == len({frozenset(parse_caption(c)) for c in captions})
    # training redraws scenes with those keys: about 2% of random scenes collide, nearly all single objects
    train = sample_scenes(3000, generator=6).keys()
    assert torch.isin(train, keys).float().mean() < 0.03


def test_missing_or_corrupt_atlas_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "atlas.json"))):
        load_atlas(tmp_path)
    shutil.copy(ATLAS_DIR / "atlas.json", tmp_path / "atlas.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "atlas.png"))):
        load_atlas(tmp_path)
    (tmp_path / "atlas.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(f"corrupt scenes atlas file {tmp_path / 'atlas.png'}")):
        load_atlas(tmp_path)
    (tmp_path / "atlas.json").write_text("{broken")
    with pytest.raises(ValueError, match=re.escape(f"corrupt scenes atlas file {tmp_path / 'atlas.json'}")):
        load_atlas(tmp_path)


def test_identity_checker_on_rendered_ground_truth():
    captions = random_captions(48, seed=11)
    images = render_captions(captions, seed=11)
    report = check_identity(images, captions)
    assert len(report.objects) >= 80
    assert report.top1 >= 0.98, [(o.name, o.found) for o in report.objects if not o.correct]
    shuffled = captions[1:] + captions[:1]
    assert check_identity(images, shuffled).top1 <= 0.1
    # PIL input gives the same answer
    pil = [PIL.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images[:4]]
    assert check_identity(pil, captions[:4]).top1 == 1.0


def test_pipeline_interface(tiny):
    images = tiny([CAPTION, "a cat at the top"], num_inference_steps=2, num_images_per_prompt=2).images
    assert len(images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (128, 128) for im in images)
    a = tiny(CAPTION, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = tiny(CAPTION, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b)
    tiny(CAPTION, num_inference_steps=1)
    assert tiny.guidance_scale == ScenesPipeline.default_guidance_scale
    tiny(CAPTION, num_inference_steps=1, guidance_scale=1.0)
    assert not tiny.do_classifier_free_guidance


def test_unknown_words_raise_with_the_vocabulary_location(tiny):
    with pytest.raises(ValueError) as info:
        tiny("a unicorn at the top and a spaceship at the moon", num_inference_steps=1)
    message = str(info.value)
    assert "['moon', 'spaceship', 'unicorn']" in message
    assert "catprune.models.scenes.OBJECT_NAMES" in message and "atlas.json" in message
    with pytest.raises(ValueError, match="negative_prompt"):
        tiny(CAPTION, negative_prompt="blurry", num_inference_steps=1)


@pytest.mark.parametrize("height, width", [(130, 128), (128, 256), (0, 128)])
def test_unsupported_size_raises(tiny, height, width):
    with pytest.raises(ValueError, match="unsupported resolution.*scenes model.*multiples of 4.*128"):
        tiny(CAPTION, height=height, width=width, num_inference_steps=1)


def test_missing_or_corrupt_weights_name_the_path(tiny, tmp_path):
    save_scenes_weights(tiny, tmp_path)
    again = load_scenes_pipeline(tmp_path)
    for key, value in tiny.transformer.state_dict().items():
        assert torch.allclose(again.transformer.state_dict()[key], value.half().float())
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_scenes_pipeline(tmp_path / "nowhere")
    (tmp_path / "text_encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=re.escape(f"corrupt weights file {tmp_path / 'text_encoder.safetensors'}")):
        load_scenes_pipeline(tmp_path)
    (tmp_path / "text_encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "text_encoder.safetensors"))):
        load_scenes_pipeline(tmp_path)


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    again = catprune.load_pipeline(str(tmp_path))
    assert isinstance(again, ScenesPipeline) and isinstance(again.tokenizer, ScenesTokenizer)


def test_shipped_weights_size_and_architecture():
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert files, f"no shipped weights under {WEIGHTS_DIR}"
    assert sum(f.stat().st_size for f in files) <= 40 * 10**6
    config = json.loads((WEIGHTS_DIR.parent / "scenes_config.json").read_text())["transformer"]
    assert config["patch_size"] == 4 and (config["sample_size"] // config["patch_size"]) ** 2 == 1024


def test_shipped_model_draws_the_named_objects_on_cpu():
    """The CI check: the shipped model, 8 fixed captions (16 objects), CPU, default guidance."""
    pipe = catprune.load_pipeline("scenes")
    assert isinstance(pipe, ScenesPipeline)
    pipe.set_progress_bar_config(disable=True)
    captions = list(QUICK_CHECK_CAPTIONS)
    generators = [torch.Generator().manual_seed(j) for j in range(len(captions))]
    images = pipe(captions, num_inference_steps=CI_STEPS, generator=generators, output_type="pt").images
    report = check_identity(images, captions)
    assert report.top1 >= 0.5, [(o.name, o.found) for o in report.objects]


CI_STEPS = 12
