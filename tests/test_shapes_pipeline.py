"""ShapesPipeline: the SD3-style loop contract, generators, save/load, bad input, and the shipped model."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from catprune.models.shapes import (
    DEFAULT_GUIDANCE_SCALE,
    ShapesPipeline,
    ShapesTextEncoder,
    ShapesTokenizer,
    build_random_shapes_pipeline,
    load_shapes_pipeline,
    save_flat_weights,
)
from catprune.models.shapes.loading import WEIGHTS_DIR

TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2)
PROMPTS = [
    "a small red circle at the top left",
    "a large blue square at the center and a small cyan triangle at the top",
]


@pytest.fixture(scope="module")
def tiny():
    pipe = build_random_shapes_pipeline(seed=0, **TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("output_type", "pt")
    return pipe(prompt, **kw).images


def test_components_and_overrides_follow():
    pipe = build_random_shapes_pipeline(seed=1, joint_attention_dim=16, pooled_projection_dim=8, **TINY)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, ShapesTextEncoder)
    assert isinstance(pipe.tokenizer, ShapesTokenizer)
    cfg = pipe.transformer.config
    assert (cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.caption_projection_dim) == (4, 3, 3, 16)
    states, pooled = pipe.text_encoder(**pipe.tokenizer(PROMPTS))
    assert states.shape == (2, 24, 16) and pooled.shape == (2, 8)
    # Same seed, same weights; the global RNG is untouched.
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    again = build_random_shapes_pipeline(seed=1, joint_attention_dim=16, pooled_projection_dim=8, **TINY)
    assert torch.equal(torch.rand(1), expected)
    assert all(
        torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), again.transformer.parameters(), strict=True)
    )


def test_transformer_called_once_per_step_with_sd3_cfg_layout(tiny):
    calls = []

    def record(module, args, kwargs):
        calls.append(
            {
                "keys": sorted(kwargs),
                "step_index": tiny.scheduler.step_index,
                "batch": kwargs["hidden_states"].shape[0],
                "text": kwargs["encoder_hidden_states"].clone(),
                "return_dict": kwargs["return_dict"],
                "args": len(args),
            }
        )

    handle = tiny.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(tiny, PROMPTS, num_inference_steps=4, guidance_scale=3.0)
        run(tiny, PROMPTS, num_inference_steps=3, guidance_scale=3.0)
        run(tiny, PROMPTS[0], num_inference_steps=2, guidance_scale=1.0)
    finally:
        handle.remove()
    assert len(calls) == 4 + 3 + 2
    assert {tuple(c["keys"]) for c in calls} == {
        ("encoder_hidden_states", "hidden_states", "pooled_projections", "return_dict", "timestep")
    }
    assert all(c["args"] == 0 and c["return_dict"] is False for c in calls)
    assert [c["step_index"] for c in calls] == [None, 1, 2, 3, None, 1, 2, None, 1]
    assert [c["batch"] for c in calls] == [4] * 7 + [1] * 2  # CFG doubles the batch; guidance 1 turns it off
    # Rows are [unconditional..., conditional...] like StableDiffusion3Pipeline.
    with torch.no_grad():
        uncond, _ = tiny.text_encoder(**tiny.tokenizer(["", ""]))
        cond, _ = tiny.text_encoder(**tiny.tokenizer(PROMPTS))
    assert torch.allclose(calls[0]["text"], torch.cat([uncond, cond]), atol=1e-6)


def test_guidance_properties(tiny):
    run(tiny, PROMPTS[0], num_inference_steps=1, guidance_scale=1.0)
    assert tiny.guidance_scale == 1.0 and not tiny.do_classifier_free_guidance
    run(tiny, PROMPTS[0], num_inference_steps=1)
    assert tiny.guidance_scale == DEFAULT_GUIDANCE_SCALE and tiny.do_classifier_free_guidance


def test_generator_list_matches_generating_alone(tiny):
    together = run(tiny, PROMPTS, generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(22)])
    alone0 = run(tiny, PROMPTS[0], generator=torch.Generator().manual_seed(11))
    alone1 = run(tiny, PROMPTS[1], generator=torch.Generator().manual_seed(22))
    assert torch.allclose(together[0], alone0[0], atol=1e-5)
    assert torch.allclose(together[1], alone1[0], atol=1e-5)
    assert not torch.allclose(alone0, alone1, atol=1e-3)
    with pytest.raises(ValueError, match="generator"):
        run(tiny, PROMPTS, generator=[torch.Generator().manual_seed(1)])


def test_output_types_and_num_images_per_prompt(tiny):
    pil = tiny(PROMPTS, num_inference_steps=2, num_images_per_prompt=2).images
    assert len(pil) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (128, 128) for im in pil)
    arr = tiny(PROMPTS[0], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 128, 128, 3)
    pt = run(tiny, PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert pt.shape == (1, 3, 128, 128) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    assert np.allclose(arr[0], pt[0].permute(1, 2, 0).numpy(), atol=1e-6)
    images = tiny(PROMPTS[0], num_inference_steps=1, return_dict=False)[0]
    assert isinstance(images, list)


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesPipeline"
    assert index["tokenizer"][1] == "ShapesTokenizer" and index["text_encoder"][1] == "ShapesTextEncoder"
    for loaded in (ShapesPipeline.from_pretrained(tmp_path), load_shapes_pipeline(tmp_path)):
        loaded.set_progress_bar_config(disable=True)
        for name in ("transformer", "text_encoder"):
            a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loaded.tokenizer.vocabulary == tiny.tokenizer.vocabulary
        kw = dict(generator=torch.Generator().manual_seed(5))
        assert torch.allclose(
            run(loaded, PROMPTS[1], **kw), run(tiny, PROMPTS[1], generator=torch.Generator().manual_seed(5)), atol=1e-5
        )


def test_flat_weights_round_trip(tiny, tmp_path):
    files = save_flat_weights(tiny, tmp_path, dtype=torch.float32)
    assert {f.name for f in files} == {"shapes_config.json", "transformer.safetensors", "text_encoder.safetensors"}
    loaded = load_shapes_pipeline(tmp_path)
    a, b = tiny.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_words_raise_with_the_vocabulary(tiny):
    with pytest.raises(ValueError) as err:
        tiny("a small red dragon at the top nowhere", num_inference_steps=1)
    message = str(err.value)
    assert "prompt" in message and "['dragon', 'nowhere']" in message
    assert "circle" in message and "bottom" in message  # the vocabulary is listed
    with pytest.raises(ValueError, match="negative_prompt .*'blurry'"):
        tiny(PROMPTS[0], negative_prompt="blurry", num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        tiny(123, num_inference_steps=1)


@pytest.mark.parametrize("height,width", [(130, 128), (256, 256), (128, 0), (128, 132)])
def test_unsupported_resolution_raises(tiny, height, width):
    with pytest.raises(ValueError, match="unsupported resolution.*multiples of 4.*128"):
        tiny(PROMPTS[0], height=height, width=width, num_inference_steps=1)


def test_missing_or_corrupt_weights_name_the_path(tiny, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_shapes_pipeline(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="transformer.safetensors"):
        load_shapes_pipeline(empty)
    shipped = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in shipped:
        if not f.name.startswith("transformer-00002"):
            (partial / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match="transformer-00002-of-00002.safetensors"):
        load_shapes_pipeline(partial)
    save_flat_weights(tiny, tmp_path / "bad")
    corrupt = tmp_path / "bad" / "transformer.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=f"corrupt weights file {corrupt}"):
        load_shapes_pipeline(tmp_path / "bad")


def test_shipped_weights_size_and_architecture():
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert files, f"no shipped weights under {WEIGHTS_DIR}"
    assert sum(f.stat().st_size for f in files) <= 40 * 10**6
    config = json.loads((Path(WEIGHTS_DIR).parent / "shapes_config.json").read_text())["transformer"]
    assert (config["sample_size"] // config["patch_size"]) ** 2 == 1024  # 32 x 32 image tokens
