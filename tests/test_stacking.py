"""catprune.stacking: diffusers' First Block Cache stacked with CAT Pruning (Flux), and refusals elsewhere."""

import pytest
import torch

import catprune
from catprune import CATConfig
from catprune.models.testing import tiny_flux_transformer, tiny_pixart_transformer, tiny_sd3_transformer
from catprune.stacking import apply_step_cache, remove_step_cache, step_cache_support
from helpers import tiny_vae

THRESHOLD = 0.5  # high enough that the tiny random Flux model skips steps


def _tiny_flux_pipeline():
    pytest.importorskip("transformers", reason="diffusers' FluxPipeline imports transformers")
    from catprune.models.testing import flux_pipeline_from_components

    vae = tiny_vae(shift_factor=0.0)  # seeds the global RNG with 0 before building
    return flux_pipeline_from_components(tiny_flux_transformer(), vae)


def _generate(pipe, steps=8):
    g = torch.Generator().manual_seed(0)
    embeds = dict(
        prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g)
    )
    return pipe(
        **embeds,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="pt",
        generator=torch.Generator().manual_seed(1),
    ).images


@pytest.fixture(scope="module")
def flux():
    pipe = _tiny_flux_pipeline()
    return pipe, _generate(pipe)


def test_step_cache_alone_differs_from_dense_and_is_removable(flux):
    pipe, dense = flux
    apply_step_cache(pipe, threshold=THRESHOLD)
    cached = _generate(pipe)
    assert torch.isfinite(cached).all() and not torch.equal(cached, dense)
    assert torch.equal(_generate(pipe), cached)  # the pipeline resets the cache state between generations
    remove_step_cache(pipe)
    assert torch.equal(_generate(pipe), dense)


@pytest.mark.parametrize("order", ["cat_first", "cache_first"])
def test_stacked_both_orders_then_removed_is_dense(flux, order):
    pipe, dense = flux
    config = CATConfig(keep_ratio=0.3, start_step=4)
    with catprune.applied(pipe, config):
        cat_alone = _generate(pipe)
    if order == "cat_first":
        catprune.apply(pipe, config)
        apply_step_cache(pipe, threshold=THRESHOLD)
    else:
        apply_step_cache(pipe, threshold=THRESHOLD)
        catprune.apply(pipe, config)
    both = _generate(pipe)
    assert torch.isfinite(both).all() and not torch.equal(both, dense)
    assert not torch.equal(both, cat_alone)  # FBCache skipped warm-up steps before the capture step
    assert catprune.stats(pipe).pruned_steps == 4
    assert torch.equal(_generate(pipe), both)
    catprune.remove(pipe)
    remove_step_cache(pipe)
    assert torch.equal(_generate(pipe), dense)


def test_capture_step_is_never_skipped(flux):
    """With a threshold that skips every step it can, CAT's K/V caches still come from a full capture step: the
    stacked output equals CAT alone when FBCache may only act before the capture step and the warm-up has one step."""
    pipe, _ = flux
    config = CATConfig(keep_ratio=0.3, start_step=2)  # steps 0 (dense, always computed) and 1 (capture)
    catprune.apply(pipe, config)
    cat_alone = _generate(pipe)
    apply_step_cache(pipe, threshold=1e6)
    stacked = _generate(pipe)
    remove_step_cache(pipe)
    catprune.remove(pipe)
    assert torch.equal(stacked, cat_alone)


@pytest.mark.parametrize("build", [tiny_sd3_transformer, tiny_pixart_transformer], ids=["sd3", "pixart"])
def test_families_without_cache_context_are_refused(build):
    with pytest.raises(NotImplementedError, match="has no CacheMixin.*cache_context"):
        apply_step_cache(build())


def test_shapes_pipeline_is_refused():
    from catprune.models.shapes import build_random_shapes_pipeline

    with pytest.raises(NotImplementedError, match="SD3Transformer2DModel has no CacheMixin"):
        apply_step_cache(build_random_shapes_pipeline())


def test_bare_transformer_unknown_kind_dbcache_and_bad_threshold(flux):
    pipe, _ = flux
    assert "pass the pipeline" in step_cache_support(tiny_flux_transformer(), "fbcache")
    assert "unknown step cache kind" in step_cache_support(pipe, "teacache")
    with pytest.raises(NotImplementedError, match="cache-dit's DBCache is not driven"):
        apply_step_cache(pipe, kind="dbcache")
    with pytest.raises(ValueError, match="threshold: expected a finite number > 0"):
        apply_step_cache(pipe, threshold=0)
    assert step_cache_support(pipe) is None
