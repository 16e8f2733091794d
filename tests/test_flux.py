"""Layer (c): the Flux family on tiny random models (CPU, fp32, fixed seeds): the equivalence contract."""

import functools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import catprune
from catprune import CATConfig
from catprune.adapters import BufferStore, adapter_for
from catprune.models.testing import flux_image_ids, tiny_flux_inputs, tiny_flux_transformer
from helpers import (
    assert_batch_equals_single_and_non_square,
    assert_macs_match_flop_counter,
    assert_stock_pipeline_contract,
    generate,
    tiny_vae,
)

BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance")


def denoise(model, inputs, steps=8):
    """A minimal rectified-flow loop over a bare transformer, called as FluxPipeline calls it."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    x = inputs["hidden_states"].clone()
    rest = {k: v for k, v in inputs.items() if k != "hidden_states"}
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(hidden_states=x, timestep=(t / 1000).expand(x.shape[0]), **rest, return_dict=False)[0]
            x = scheduler.step(v, t, x).prev_sample
    return x


def row(inputs, i):
    """Sample ``i`` of a batch of inputs (position ids are shared by the batch)."""
    return {k: (v[i : i + 1] if k in BATCHED else v) for k, v in inputs.items()}


def call_kwargs(inputs, t=0.5):
    b = inputs["hidden_states"].shape[0]
    return dict(**inputs, timestep=torch.full((b,), t), return_dict=False)


@pytest.fixture(params=["dev", "schnell"])
def model(request):
    # FLUX.1-dev embeds the guidance scale; schnell does not
    return tiny_flux_transformer(guidance_embeds=request.param == "dev")


@pytest.fixture
def inputs(model):
    return tiny_flux_inputs(model, batch=2, height=8, width=12)  # a 4 x 6 token grid


def test_every_block_caches_all_image_and_text_keys(model, inputs):
    """Double- and single-stream blocks each own a (2, B, M + T, H, hd) cache (kept-token counts: the contract)."""
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3))
    denoise(model, inputs, steps=8)
    m = 4 * 6
    view = catprune.inspect(model)
    assert catprune.stats(model).pruned_steps == 5
    assert len(view.kv_cache_shapes) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert all(shape == (2, 2, m + 5, 2, 16) for shape in view.kv_cache_shapes)  # (2, B, M + T, H, hd)


def test_partial_selection_uses_cached_keys_and_values(model):
    """Per-sample selections: fresh, rotated K/V at idx; cached K/V of unselected tokens untouched."""
    adapter = adapter_for(model)
    inputs = tiny_flux_inputs(model, batch=2, height=8, width=8)
    kwargs = call_kwargs(inputs)
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore() for _ in range(adapter.num_caches())]
    with torch.no_grad(), adapter.capture(caches, info):
        dense = model(**kwargs)[0]
    idx = torch.tensor([[0, 3, 5, 9], [15, 2, 7, 8]])  # each sample its own tokens (own RoPE positions)
    before = [c["attn"].clone() for c in caches]
    with torch.no_grad():
        out = adapter.pruned_forward(caches, idx, info)
    # same inputs: the selected tokens get the dense outputs, their fresh K/V equal the captured (rotated) ones
    assert torch.allclose(out, dense.gather(1, idx[..., None].expand_as(out)), atol=1e-5)
    for cache, old in zip(caches, before, strict=True):
        assert torch.allclose(cache["attn"][:, :, :16], old[:, :, :16], atol=1e-5)

    # other inputs (a later timestep): only the selected tokens' K/V change, the unselected stay bit-identical
    later = adapter.inspect_call((), call_kwargs(inputs, t=0.3))
    snapshot = [c["attn"].clone() for c in caches]
    with torch.no_grad():
        adapter.pruned_forward(caches, idx, later)
    chosen = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, idx, True)  # (B, M)
    for cache, old in zip(caches, snapshot, strict=True):
        new, prev = cache["attn"][:, :, :16], old[:, :, :16]  # (2, B, M, H, hd)
        assert torch.equal(new[:, ~chosen], prev[:, ~chosen])
        assert not torch.allclose(new[:, chosen], prev[:, chosen])


def test_controlnet_residuals_follow_the_selected_tokens(model):
    """ControlNet residuals (double- and single-stream, with and without repeat) are gathered at the selection."""
    adapter = adapter_for(model)
    inputs = tiny_flux_inputs(model, batch=2, height=8, width=8)
    g = torch.Generator().manual_seed(1)
    d = model.inner_dim
    for repeat in (False, True):
        kwargs = call_kwargs(inputs)
        kwargs.update(
            controlnet_block_samples=[torch.randn(2, 16, d, generator=g)],
            controlnet_single_block_samples=[torch.randn(2, 16, d, generator=g) for _ in range(2)],
            controlnet_blocks_repeat=repeat,
        )
        info = adapter.inspect_call((), kwargs)
        caches = [BufferStore() for _ in range(adapter.num_caches())]
        with torch.no_grad():
            with adapter.capture(caches, info):
                dense = model(**kwargs)[0]
            assert adapter.fast_inputs(info) is None  # eager path
            idx = torch.tensor([[1, 4, 6, 11], [0, 13, 14, 15]])
            out = adapter.pruned_forward(caches, idx, info)
        assert torch.allclose(out, dense.gather(1, idx[..., None].expand_as(out)), atol=1e-5)


def test_resolution_and_batch_changes_between_generations(model):
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2))
    a = denoise(model, tiny_flux_inputs(model, batch=2, height=8, width=8), steps=5)
    b = denoise(model, tiny_flux_inputs(model, batch=3, height=12, width=6, text_tokens=7), steps=5)
    assert catprune.stats(model).steps[-1].tokens == 6 * 3
    c = denoise(model, tiny_flux_inputs(model, batch=2, height=8, width=8), steps=5)
    assert b.shape == (3, 18, 16) and torch.isfinite(b).all()
    assert torch.equal(a, c)
    assert catprune.stats(model).steps[-1].tokens == 16
    assert catprune.inspect(model).grid == (4, 4)


def test_grid_is_read_from_img_ids(model):
    adapter = adapter_for(model)
    inputs = tiny_flux_inputs(model, batch=1, height=12, width=6)
    assert adapter.inspect_call((), call_kwargs(inputs)).grid == (6, 3)
    inputs["img_ids"] = inputs["img_ids"][None]  # the deprecated (1, M, 3) form diffusers still accepts
    assert adapter.inspect_call((), call_kwargs(inputs)).grid == (6, 3)
    inputs["img_ids"] = flux_image_ids(6, 3) + torch.tensor([0.0, 2.0, 5.0])  # an offset grid is still raster
    assert adapter.inspect_call((), call_kwargs(inputs)).grid == (6, 3)


def test_macs_match_flop_counter():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=3)
    adapter = adapter_for(model)
    inputs = tiny_flux_inputs(model, batch=2, height=16, width=16, text_tokens=7)
    kwargs = call_kwargs(inputs)
    caches = [BufferStore() for _ in range(adapter.num_caches())]
    assert_macs_match_flop_counter(model, adapter, kwargs, caches)


def test_static_functions_match_the_eager_path(model, inputs):
    """dense_fn / pruned_fn (what compile and CUDA graphs run) on fast_inputs equal the eager calls."""
    adapter = adapter_for(model)
    kwargs = call_kwargs(inputs)
    info = adapter.inspect_call((), kwargs)
    fast = adapter.fast_inputs(info)
    assert set(fast) >= {"hidden_states", "timestep", "img_ids", "txt_ids"}
    assert ("guidance" in fast) == model.config.guidance_embeds
    caches = [BufferStore() for _ in range(adapter.num_caches())]
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        assert torch.equal(adapter.dense_fn(model.forward)(**fast), dense)
        idx = torch.tensor([[0, 5, 7, 20], [3, 9, 12, 23]])
        eager = adapter.pruned_forward(caches, idx, info)
        static = adapter.pruned_fn(caches, info)(idx=idx, **fast)
    assert torch.equal(static, eager)


# ---------------------------------------------------------------- errors
def test_unsupported_models_are_refused_at_apply():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_flux_transformer()
    model.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn.*AttnProcessor2_0.*FluxAttnProcessor"):
        catprune.apply(model)
    assert not catprune.is_applied(model)

    model = tiny_flux_transformer()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV.*unfuse_qkv_projections"):
        catprune.apply(model)


def test_fusing_after_apply_is_caught_before_the_caches_are_used(model, inputs):
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2))
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        denoise(model, inputs, steps=4)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden_states=torch.randn(2, 4, 4, 4)), ValueError, r"hidden_states: expected packed latents"),
        (dict(hidden_states=torch.randn(2, 16, 12)), ValueError, r"hidden_states: .*\(batch, image_tokens, 16\)"),
        (dict(encoder_hidden_states=None), ValueError, "encoder_hidden_states: expected"),
        (dict(pooled_projections=torch.randn(2, 3)), ValueError, r"pooled_projections: expected a \(2, 8\)"),
        (dict(timestep=0.5), ValueError, "timestep: expected a tensor"),
        (dict(img_ids=torch.zeros(15, 3)), ValueError, r"img_ids: expected position ids of shape \(16, 3\)"),
        (dict(txt_ids=torch.zeros(5, 2)), ValueError, r"txt_ids: expected position ids of shape \(5, 3\)"),
        (dict(img_ids=flux_image_ids(4, 4)[torch.randperm(16)]), ValueError, "img_ids: expected .* raster order"),
        (dict(img_ids=flux_image_ids(2, 8)[torch.arange(16).view(2, 8).t().reshape(-1)]), ValueError, "raster"),
        (dict(joint_attention_kwargs={"ip_adapter_image_embeds": [None]}), NotImplementedError, "IP-Adapter"),
        (dict(joint_attention_kwargs={"attention_mask": None}), ValueError, r"joint_attention_kwargs: .*'scale'"),
    ],
)
def test_clear_errors_on_unsupported_inputs(change, error, match):
    model = tiny_flux_transformer()
    kwargs = {**call_kwargs(tiny_flux_inputs(model, batch=2, height=8, width=8)), **change}
    with pytest.raises(error, match=match):
        adapter_for(model).inspect_call((), kwargs)


def test_guidance_must_match_the_model():
    dev = tiny_flux_transformer(guidance_embeds=True)
    kwargs = call_kwargs(tiny_flux_inputs(dev, batch=2, height=8, width=8))
    kwargs.pop("guidance")
    with pytest.raises(ValueError, match="guidance: this model embeds the guidance scale"):
        adapter_for(dev).inspect_call((), kwargs)
    schnell = tiny_flux_transformer(guidance_embeds=False)
    kwargs = call_kwargs(tiny_flux_inputs(schnell, batch=2, height=8, width=8))
    kwargs["guidance"] = torch.full((2,), 3.5)
    with pytest.raises(ValueError, match="guidance: this model has no guidance embedding"):
        adapter_for(schnell).inspect_call((), kwargs)


def test_two_calls_per_step_true_cfg_is_refused(model, inputs):
    """A second call on the same latents with other text (true CFG's negative branch) raises before pruning."""
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2))
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    x = inputs["hidden_states"].clone()
    t = torch.full((2,), 1.0)
    rest = {k: v for k, v in inputs.items() if k not in ("hidden_states", "encoder_hidden_states")}
    with torch.no_grad():
        model(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"], timestep=t, **rest)
        with pytest.raises(NotImplementedError, match="true_cfg_scale"):
            model(hidden_states=x, encoder_hidden_states=negative, timestep=t, **rest)
    # an ordinary generation afterwards starts afresh and prunes
    pruned = denoise(model, inputs, steps=5)
    assert torch.isfinite(pruned).all() and catprune.stats(model).pruned_steps == 3


# ---------------------------------------------------------------- a stock diffusers pipeline
def _tiny_flux_pipeline(**overrides):
    pytest.importorskip("transformers", reason="diffusers' FluxPipeline imports transformers")
    from catprune.models.testing import flux_pipeline_from_components

    vae = tiny_vae(shift_factor=0.0)
    return flux_pipeline_from_components(tiny_flux_transformer(**overrides), vae)


def _embeds(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(batch, 8, generator=g)
    )


_generate = functools.partial(generate, guidance_scale=3.5)


def test_stock_pipeline_contract():
    pipe = _tiny_flux_pipeline()
    embeds = _embeds(1)
    dense, _ = assert_stock_pipeline_contract(pipe, _generate, embeds, CATConfig(keep_ratio=0.3, start_step=3))
    assert not catprune.inspect(pipe).cfg_shared  # FluxPipeline has no CFG batch
    s = catprune.stats(pipe)
    assert s.pruned_steps == 5 and s.steps[-1].tokens == 64 and s.steps[-1].computed == round(0.3 * 64)
    catprune.remove(pipe)
    assert torch.equal(_generate(pipe, embeds, [1]), dense)


def test_stock_pipeline_batch_equals_single_and_non_square():
    pipe = catprune.apply(_tiny_flux_pipeline(guidance_embeds=False), CATConfig(keep_ratio=0.3, start_step=3))
    assert_batch_equals_single_and_non_square(pipe, _generate, _embeds(2, seed=4), _embeds(2), rows=2)  # no CFG


def test_stock_pipeline_true_cfg_is_refused_with_advice():
    pipe = _tiny_flux_pipeline()
    embeds = _embeds(1)
    negative = dict(negative_prompt_embeds=torch.randn(1, 5, 16), negative_pooled_prompt_embeds=torch.randn(1, 8))
    dense = _generate(pipe, embeds, [1], **negative, true_cfg_scale=2.0)  # two transformer calls per step
    catprune.apply(pipe, CATConfig(keep_ratio=0.3, start_step=3))
    with pytest.raises(NotImplementedError, match="true_cfg_scale=1.*catprune.remove"):
        _generate(pipe, embeds, [1], **negative, true_cfg_scale=2.0)
    plain = _generate(pipe, embeds, [1])  # without true CFG it works (and starts afresh)
    assert torch.isfinite(plain).all() and catprune.stats(pipe).pruned_steps == 5
    with catprune.applied(pipe, CATConfig(keep_ratio=1.0)):  # pruning off: true CFG untouched
        assert torch.equal(_generate(pipe, embeds, [1], **negative, true_cfg_scale=2.0), dense)
