"""Layer (c): PixArt-Sigma on tiny random models (CPU, fp32, fixed seeds): the equivalence contract."""

import functools

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import catprune
from catprune import CATConfig
from catprune.adapters import BufferStore, adapter_for, supported_models
from catprune.adapters.pixart import PixArtAdapter
from catprune.models.testing import tiny_pixart_inputs, tiny_pixart_transformer
from helpers import (
    assert_batch_equals_single_and_non_square,
    assert_cfg_rows_share_selection,
    assert_macs_match_flop_counter,
    assert_stock_pipeline_contract,
    generate,
    pixart_output,
    tiny_vae,
)

# PixArt-Alpha style: resolution / aspect-ratio micro-conditions (need a width divisible by 3)
ALPHA_STYLE = dict(use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24)


def _added(batch, height=8, width=8):
    return dict(
        resolution=torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1),
        aspect_ratio=torch.tensor([[height / width]]).repeat(batch, 1),
    )


def denoise(model, inputs, steps=8, added_cond_kwargs=None):
    """A minimal DPM-Solver++ loop over a bare transformer, like PixArtSigmaPipeline's (learned sigma dropped)."""
    scheduler = DPMSolverMultistepScheduler()
    x = inputs["hidden_states"].clone()
    scheduler.set_timesteps(steps, device=x.device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pixart_output(model, x, inputs, t, added_cond_kwargs=added_cond_kwargs)
            x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.fixture(params=["sigma", "alpha-conds"])
def model(request):
    return tiny_pixart_transformer(**(ALPHA_STYLE if request.param == "alpha-conds" else {}))


@pytest.fixture
def inputs(model):
    return tiny_pixart_inputs(model, batch=2, height=8, width=12, masked_text_tokens=2)


def _run(model, inputs, steps=8):
    added = _added(inputs["hidden_states"].shape[0], 8, 12) if model.use_additional_conditions else None
    return denoise(model, inputs, steps=steps, added_cond_kwargs=added)


def _call_kwargs(model, inputs, t=500):
    b, _, h, w = inputs["hidden_states"].shape
    kwargs = dict(**inputs, timestep=torch.full((b,), t), return_dict=False)
    if model.use_additional_conditions:
        kwargs["added_cond_kwargs"] = _added(b, h, w)
    return kwargs


def test_registered_and_looked_up_by_class(model):
    assert isinstance(adapter_for(model), PixArtAdapter)
    assert any(name.startswith("PixArtTransformer2DModel") for name in supported_models())


@pytest.mark.parametrize("masks", ["none", "text", "text+image"])
def test_full_selection_pruned_step_equals_dense_step(model, masks):
    """Eager semantics of the pruned path: with every token selected it is the dense forward."""
    adapter = adapter_for(model)
    inputs = tiny_pixart_inputs(model, batch=2, height=8, width=8, masked_text_tokens=2 if masks != "none" else 0)
    kwargs = _call_kwargs(model, inputs)
    if masks == "none":
        kwargs["encoder_attention_mask"] = None
    if masks == "text+image":
        kwargs["attention_mask"] = torch.ones(2, 16).index_fill_(1, torch.tensor([3, 7]), 0.0)  # (B, M) keep-mask
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore() for _ in model.transformer_blocks]
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        assert all(len(m._forward_hooks) == 0 for m in model.modules())  # capture leaves no hooks
        idx = torch.arange(16).flip(0).expand(2, 16)  # every token, in another order
        tokens = adapter.pruned_forward(caches, idx, info)  # (B, M, P) in idx order
    assert tokens.shape == (2, 16, 2 * 2 * 8)  # both learned-sigma halves
    rebuilt = adapter.build_output(tokens.flip(1), info)[0]
    assert torch.allclose(rebuilt, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.unpatchify(adapter.output_tokens((dense,), info), info), dense)


def test_output_tokens_match_the_models_own_patch_order(model):
    """Token j of output_tokens is proj_out's row for image token j (the runtime scatters pruned rows there)."""
    adapter = adapter_for(model)
    kwargs = _call_kwargs(model, tiny_pixart_inputs(model, batch=1, height=6, width=10))
    info = adapter.inspect_call((), kwargs)
    rows = []
    handle = model.proj_out.register_forward_hook(lambda _m, _i, out: rows.append(out))
    try:
        with torch.no_grad():
            out = model(**kwargs)
    finally:
        handle.remove()
    assert torch.equal(adapter.output_tokens(out, info), rows[0])  # (1, 15, P)
    assert isinstance(adapter.wrap_sample(out[0], info), tuple)  # return_dict=False, as called


def test_partial_selection_uses_cached_keys_and_values(model):
    """A pruned step writes fresh K/V only at the selected tokens; the cached K/V of the others stay untouched."""
    adapter = adapter_for(model)
    kwargs = _call_kwargs(model, tiny_pixart_inputs(model, batch=1, height=8, width=8, masked_text_tokens=1))
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore() for _ in model.transformer_blocks]
    with torch.no_grad(), adapter.capture(caches, info):
        model(**kwargs)
    idx = torch.tensor([[0, 3, 5, 9]])
    before = [c["attn"].clone() for c in caches]
    with torch.no_grad():
        out = adapter.pruned_forward(caches, idx, info)
    assert out.shape == (1, 4, model.proj_out.out_features)
    # same inputs -> the selected tokens' fresh K/V equal the cached ones
    assert all(torch.allclose(c["attn"], b, atol=1e-5) for c, b in zip(caches, before, strict=True))

    # new latents: the selected tokens' K/V change, every other token's cached K/V is exactly as it was
    moved = dict(kwargs, hidden_states=kwargs["hidden_states"] + 1.0, timestep=torch.full((1,), 300))
    with torch.no_grad():
        adapter.pruned_forward(caches, idx, adapter.inspect_call((), moved))
    unselected = torch.ones(16, dtype=torch.bool).index_fill_(0, idx[0], False)
    for c, b in zip(caches, before, strict=True):
        after = c["attn"]  # (2, B, M, H, hd)
        assert torch.equal(after[:, :, unselected], b[:, :, unselected])
        assert not torch.allclose(after[0, :, idx[0]], b[0, :, idx[0]])  # fresh keys
        assert not torch.allclose(after[1, :, idx[0]], b[1, :, idx[0]])  # fresh values
    # block 0's K/V of a token depend on that token alone: the fresh ones equal a dense step's on the new latents
    fresh = [BufferStore() for _ in model.transformer_blocks]
    with torch.no_grad(), adapter.capture(fresh, adapter.inspect_call((), moved)):
        model(**moved)
    assert torch.allclose(caches[0]["attn"][:, :, idx[0]], fresh[0]["attn"][:, :, idx[0]], atol=1e-5)


def test_cfg_rows_share_selection_scored_on_conditional_row(model):
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2, cfg="shared"))
    inputs = tiny_pixart_inputs(model, batch=4, height=8, width=8)
    added = _added(4) if model.use_additional_conditions else None
    denoise(model, inputs, steps=4, added_cond_kwargs=added)
    assert_cfg_rows_share_selection(catprune.inspect(model))


def test_batch_matches_single_samples(model):
    """Per-sample selection: each row of a batch gets what it gets alone (within fp32 tolerance)."""
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, cfg="per_row"))
    inputs = tiny_pixart_inputs(model, batch=2, height=8, width=8, seed=3, masked_text_tokens=1)
    inputs["encoder_attention_mask"][1, 1] = 0  # rows with different masks
    added = _added(2) if model.use_additional_conditions else None
    both = denoise(model, inputs, steps=8, added_cond_kwargs=added)
    for row in range(2):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        alone = denoise(model, single, steps=8, added_cond_kwargs=_added(1) if added else None)
        assert torch.allclose(both[row : row + 1], alone, atol=1e-4), (both[row] - alone[0]).abs().max()


def test_resolution_batch_and_mask_changes_between_generations():
    model = catprune.apply(tiny_pixart_transformer(), CATConfig(keep_ratio=0.3, start_step=2))
    a = denoise(model, tiny_pixart_inputs(model, batch=2, height=8, width=8), steps=5)
    b = denoise(model, tiny_pixart_inputs(model, batch=3, height=12, width=6), steps=5)
    unmasked = tiny_pixart_inputs(model, batch=2, height=8, width=8)
    del unmasked["encoder_attention_mask"]  # a mask that disappears changes the call's signature
    c = denoise(model, unmasked, steps=5)
    d = denoise(model, tiny_pixart_inputs(model, batch=2, height=8, width=8), steps=5)
    assert b.shape == (3, 4, 12, 6) and torch.isfinite(b).all()
    assert torch.allclose(a, c, atol=1e-5)  # an all-ones mask is no mask
    assert torch.equal(a, d)
    assert catprune.stats(model).steps[-1].tokens == 16


def test_macs_match_flop_counter():
    model = tiny_pixart_transformer(
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=3,
        cross_attention_dim=48,
        caption_channels=40,
        use_additional_conditions=True,
    )
    adapter = adapter_for(model)
    inputs = tiny_pixart_inputs(model, batch=2, height=16, width=16, text_tokens=7, masked_text_tokens=2)
    kwargs = dict(**inputs, timestep=torch.tensor([500, 500]), added_cond_kwargs=_added(2, 16, 16), return_dict=False)
    caches = [BufferStore() for _ in model.transformer_blocks]
    assert_macs_match_flop_counter(model, adapter, kwargs, caches)


def test_static_functions_match_the_eager_paths(model):
    """dense_fn / pruned_fn (the compile / CUDA-graph entry points) over fast_inputs equal the eager calls."""
    adapter = adapter_for(model)
    kwargs = _call_kwargs(model, tiny_pixart_inputs(model, batch=2, height=8, width=8, masked_text_tokens=2))
    kwargs["attention_mask"] = torch.ones(2, 16).index_fill_(1, torch.tensor([2]), 0.0)
    info = adapter.inspect_call((), kwargs)
    inputs = adapter.fast_inputs(info)
    assert all(isinstance(v, torch.Tensor) for v in inputs.values())
    assert inputs["timestep"].shape == (2,) and inputs["encoder_attention_mask"].shape == (2, 1, 5)
    caches = [BufferStore() for _ in model.transformer_blocks]
    idx = torch.tensor([[1, 4, 9, 15], [0, 2, 3, 8]])
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        assert torch.equal(adapter.dense_fn(model.forward)(**inputs), dense)
        eager = adapter.pruned_forward(caches, idx, info)
        static = adapter.pruned_fn(caches, info)(idx=idx, **inputs)
    assert torch.equal(static, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["cudagraph", "compile+cudagraph"])
def test_graph_backend_matches_eager_on_cuda(backend):
    model = tiny_pixart_transformer().cuda()
    inputs = {
        k: v.cuda() for k, v in tiny_pixart_inputs(model, batch=2, height=8, width=12, masked_text_tokens=2).items()
    }
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3))
    eager = denoise(model, inputs)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, backend=backend))
    graphed = denoise(model, inputs)
    assert torch.allclose(graphed, eager, atol=1e-4), (graphed - eager).abs().max()
    assert torch.equal(denoise(model, inputs), graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_function_makes_no_host_sync_on_cuda():
    model = tiny_pixart_transformer(**ALPHA_STYLE).cuda()
    adapter = adapter_for(model)
    inputs = {
        k: v.cuda() for k, v in tiny_pixart_inputs(model, batch=2, height=8, width=8, masked_text_tokens=2).items()
    }
    kwargs = _call_kwargs(model, inputs)
    kwargs["timestep"] = kwargs["timestep"].cuda()
    kwargs["added_cond_kwargs"] = {k: v.cuda() for k, v in kwargs["added_cond_kwargs"].items()}
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore() for _ in model.transformer_blocks]
    with torch.no_grad():
        with adapter.capture(caches, info):
            model(**kwargs)
        fast = adapter.fast_inputs(info)
        pruned = adapter.pruned_fn(caches, info)
        idx = torch.tensor([[1, 4, 9, 15], [0, 2, 3, 8]], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = pruned(idx=idx, **fast)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()


# ---------------------------------------------------------------- errors
def test_model_validation_errors():
    model = tiny_pixart_transformer()
    model.set_attn_processor(AttnProcessor())  # PixArt's own set_default_attn_processor picks this one
    with pytest.raises(ValueError, match=r"AttnProcessor2_0.*set_attn_processor"):
        catprune.apply(model)
    model.set_attn_processor(AttnProcessor2_0())
    catprune.apply(model)
    model = tiny_pixart_transformer()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedAttnProcessor2_0.*unfuse_qkv_projections"):
        catprune.apply(model)
    model = tiny_pixart_transformer()
    model.transformer_blocks[1].attn1.rescale_output_factor = 2.0
    with pytest.raises(ValueError, match=r"transformer_blocks\[1\]\.attn1 uses rescale_output_factor"):
        catprune.apply(model)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden_states=torch.randn(2, 16, 4)), ValueError, r"hidden_states: expected a \(batch, 4, height"),
        (dict(hidden_states=torch.randn(2, 4, 7, 8)), ValueError, "divisible by the patch size 2"),
        (dict(encoder_hidden_states=None), ValueError, r"encoder_hidden_states: expected a \(2, text_tokens, 12\)"),
        (dict(encoder_hidden_states=torch.randn(2, 5, 16)), ValueError, r"got a tensor of shape \(2, 5, 16\)"),
        (dict(timestep=torch.tensor(500)), ValueError, r"timestep: expected a tensor of shape \(2,\)"),
        (dict(timestep=500), ValueError, r"timestep: .* got 500"),
        (
            dict(encoder_attention_mask=torch.ones(2, 4)),
            ValueError,
            r"encoder_attention_mask: expected None, a \(2, 5\)",
        ),
        (dict(attention_mask=torch.ones(2, 16, 16)), ValueError, "attention_mask: .*key masks only"),
        (
            dict(cross_attention_kwargs={"gligen": {}}),
            NotImplementedError,
            r"cross_attention_kwargs keys \['gligen'\]",
        ),
    ],
)
def test_call_errors_name_the_argument(change, error, match):
    model = catprune.apply(tiny_pixart_transformer(), CATConfig(keep_ratio=0.3, start_step=2))
    kwargs = dict(_call_kwargs(model, tiny_pixart_inputs(model, batch=2, height=8, width=8)), **change)
    with pytest.raises(error, match=match), torch.no_grad():
        model(**kwargs)


def test_missing_additional_conditions_is_a_clear_error():
    model = catprune.apply(tiny_pixart_transformer(**ALPHA_STYLE), CATConfig(keep_ratio=0.3, start_step=2))
    kwargs = _call_kwargs(model, tiny_pixart_inputs(model, batch=2, height=8, width=8))
    kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['resolution'\].*use_additional_conditions=True"):
        model(**kwargs)


# ---------------------------------------------------------------- a stock diffusers pipeline
def _tiny_pixart_pipeline():
    pytest.importorskip("transformers", reason="diffusers' PixArtSigmaPipeline imports transformers")
    from catprune.models.testing import pixart_pipeline_from_components

    vae = tiny_vae()
    return pixart_pipeline_from_components(tiny_pixart_transformer(), vae)


def _embeds(batch, seed=0, text_tokens=6, masked=0):
    """Prompt embeddings and T5-style attention masks (the last ``masked`` tokens of each prompt are padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    if masked:
        mask[:, text_tokens - masked :] = 0
    negative_mask = torch.zeros(batch, text_tokens, dtype=torch.long)
    negative_mask[:, :2] = 1  # an empty negative prompt: a couple of real tokens, the rest padding
    return dict(
        prompt_embeds=torch.randn(batch, text_tokens, 12, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(batch, text_tokens, 12, generator=g),
        negative_prompt_attention_mask=negative_mask,
    )


# the pipeline's default negative prompt "" conflicts with negative_prompt_embeds
_generate = functools.partial(generate, negative_prompt=None, use_resolution_binning=False)


@pytest.mark.parametrize("masked", [0, 2])
def test_stock_pipeline_contract(masked):
    pipe = _tiny_pixart_pipeline()
    embeds = _embeds(1, masked=masked)
    other = _generate(pipe, embeds, [2])  # another seed: the scale of an unrelated difference
    # PixArtSigmaPipeline has no do_classifier_free_guidance, so cfg="auto" cannot see CFG: ask for "shared"
    config = CATConfig(keep_ratio=0.3, start_step=3, cfg="shared")
    dense, pruned = assert_stock_pipeline_contract(pipe, _generate, embeds, config, late_start=20)
    assert (pruned - dense).abs().mean() < 0.25 * (other - dense).abs().mean()
    view = catprune.inspect(pipe)
    assert view.cfg_shared and torch.equal(view.next_selection[0], view.next_selection[1])  # CFG rows share
    assert catprune.stats(pipe).pruned_steps == 5
    assert catprune.stats(pipe).steps[-1].rows == 2
    catprune.remove(pipe)
    assert torch.equal(_generate(pipe, embeds, [1]), dense)


def test_stock_pipeline_masked_text_tokens_are_ignored():
    """Changing the embeddings of masked (padding) text tokens changes nothing, dense or pruned."""
    pipe = catprune.apply(_tiny_pixart_pipeline(), CATConfig(keep_ratio=0.3, start_step=3, cfg="shared"))
    embeds = _embeds(1, masked=2)
    first = _generate(pipe, embeds, [2])
    embeds["prompt_embeds"][:, -2:] = 100.0  # garbage in the masked slots
    embeds["negative_prompt_embeds"][:, 2:] = -100.0
    assert torch.allclose(_generate(pipe, embeds, [2]), first, atol=1e-5)


def test_stock_pipeline_cfg_auto_detects_guidance():
    """PixArtSigmaPipeline has no do_classifier_free_guidance attribute: the runtime recognises the CFG batch by its
    repeated latents (and a batch of distinct samples is not mistaken for one)."""
    pipe = catprune.apply(_tiny_pixart_pipeline(), CATConfig(keep_ratio=0.3, start_step=3))
    _generate(pipe, _embeds(1), [1], steps=4)
    assert catprune.inspect(pipe).cfg_shared
    _generate(pipe, _embeds(2), [1, 2], steps=4, guidance_scale=1.0)
    assert not catprune.inspect(pipe).cfg_shared


def test_stock_pipeline_batch_equals_single_and_non_square():
    pipe = catprune.apply(_tiny_pixart_pipeline(), CATConfig(keep_ratio=0.3, start_step=3, cfg="shared"))
    embeds = _embeds(2, seed=4, masked=1)
    assert_batch_equals_single_and_non_square(pipe, _generate, embeds, _embeds(2), rows=4)  # 2 images x CFG
