"""The procedural adherence checker: >= 0.99 on rendered ground truth, and it catches wrong images."""

import numpy as np
import PIL.Image
import pytest
import torch

from catprune.evaluation.adherence import (
    HELD_OUT_CAPTION_SEED,
    check_adherence,
    connected_components,
    find_regions,
    measure_shapes_quality,
    to_image_tensor,
)
from catprune.models.shapes import build_random_shapes_pipeline
from catprune.models.shapes.world import random_captions, render_captions, render_scenes, scenes_from_captions


def test_ground_truth_scores_at_least_099():
    captions = random_captions(120, seed=HELD_OUT_CAPTION_SEED)
    report = check_adherence(render_captions(captions, seed=1), captions)
    assert report.num_objects > 150
    assert report.colour_at_cell >= 0.99, report.summary()
    assert report.shape >= 0.99, report.summary()


@pytest.mark.parametrize(
    "claimed,colour_ok,shape_ok",
    [
        ("a large red circle at the center", True, True),
        ("a large red square at the center", True, False),
        ("a large red triangle at the center", True, False),
        ("a large blue circle at the center", False, False),
        ("a large red circle at the top left", False, False),
    ],
)
def test_wrong_captions_fail(claimed, colour_ok, shape_ok):
    image = render_captions(["a large red circle at the center"], seed=0)
    report = check_adherence(image, [claimed])
    assert report.colour_at_cell == float(colour_ok) and report.shape == float(shape_ok)


def test_hard_ground_truth_cases():
    captions = [
        # Clipped by the image border (large objects in corner cells, jitter pushed outwards).
        "a large cyan circle at the top left",
        "a large black triangle at the bottom right",
        "a large green square at the top right",
        # Same colour, overlapping neighbours; and an object partly covered by the second one.
        "a large blue square at the center and a large blue circle at the right",
        "a large orange triangle at the right and a large black square at the bottom right",
    ]
    scenes = scenes_from_captions(captions, generator=0)
    scenes.offset[:3] = torch.tensor([[-0.028, -0.028], [0.028, 0.028], [0.028, -0.028]]).view(3, 1, 2)
    report = check_adherence(render_scenes(scenes), captions)
    assert report.colour_at_cell == 1.0 and report.shape == 1.0, [
        (o.object, o.predicted_shape, o.shape_iou) for o in report.objects
    ]


def test_accepts_pil_numpy_and_tensor():
    captions = random_captions(3, seed=2)
    images = render_captions(captions, seed=0)
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pils = [PIL.Image.fromarray(a) for a in arrays]
    for given in (images, arrays, pils):
        assert check_adherence(given, captions).summary()["colour_at_cell"] == 1.0
    assert to_image_tensor(pils[0]).shape == (1, 3, 128, 128)
    with pytest.raises(ValueError, match="one caption per image"):
        check_adherence(images, captions[:2])
    with pytest.raises(TypeError, match="PIL"):
        to_image_tensor([1, 2])


def test_connected_components_and_regions():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0:2] = True
    mask[0, 1, 2] = True  # diagonal neighbour: same component (8-connectivity)
    mask[0, 4:6, 4:6] = True
    labels = connected_components(mask)[0]
    assert labels[0, 0] == labels[0, 1] == labels[1, 2] != labels[4, 4]
    assert int((labels > 0).sum()) == 7 and len(labels.unique()) == 3
    big = torch.zeros(1, 9, 9, dtype=torch.bool)
    big[0, 1:5, 1:4] = True  # 12 pixels, 4 of them inside the top-left cell (rows and columns 0..2)
    regions, counts = find_regions(big, ["top left"])
    assert int(counts[0]) == 4 and int(regions[0].sum()) == 12


def test_measure_shapes_quality_runs_on_a_pipeline():
    pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    captions = [
        "a small red circle at the top",
        "a large blue square at the center and a small cyan circle at the left",
    ]
    result = measure_shapes_quality(pipe, captions=captions, num_inference_steps=2, batch_size=1)
    assert result.num_captions == 2 and result.num_objects == 3
    assert result.guidance_scale == pipe.default_guidance_scale
    assert result.colour_at_cell == 0.0  # random weights draw noise, not shapes
