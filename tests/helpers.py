"""Helpers shared by the model-family tests: the tiny VAE of the stock-pipeline tests, one stock-pipeline call,
a rectified-flow loop over a bare SD3 transformer and one call of a bare PixArt transformer."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def tiny_vae(**overrides):
    """A tiny random ``AutoencoderKL`` (one block of 8 channels) for a stock pipeline of 16-pixel images.

    Seeds the global RNG with 0 first, so the model built after it (the transformer) is reproducible too.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.0,
    )
    return AutoencoderKL(**config, **overrides).eval()


def generate(pipe, embeds, seeds, height=16, width=16, steps=8, guidance_scale=3.0, **extra):
    """One call of a stock pipeline on precomputed ``embeds``, one generator per seed, images as a tensor."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        **embeds,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="pt",
        generator=generators if len(generators) > 1 else generators[0],
        **extra,
    ).images


def flow_denoise(model, inputs, steps=6):
    """A minimal rectified-flow loop over a bare SD3 transformer, like a diffusers pipeline's."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(
                hidden_states=x,
                encoder_hidden_states=inputs["encoder_hidden_states"],
                pooled_projections=inputs["pooled_projections"],
                timestep=t.expand(x.shape[0]),
                return_dict=False,
            )[0]
            x = scheduler.step(v, t, x).prev_sample
    return x


def pixart_output(model, x, inputs, t, **extra):
    """One call of a bare PixArt transformer on latents ``x`` at timestep ``t`` (a 0-d tensor), learned-sigma
    channels dropped: the part of the output a denoising loop uses."""
    out = model(
        hidden_states=x,
        encoder_hidden_states=inputs["encoder_hidden_states"],
        encoder_attention_mask=inputs.get("encoder_attention_mask"),
        timestep=t.expand(x.shape[0]),
        return_dict=False,
        **extra,
    )[0]
    return out[:, : x.shape[1]]


def assert_macs_match_flop_counter(model, adapter, kwargs, caches):
    """The adapter's MAC count of a dense step (64 image tokens) and of a pruned step (every 4th token) is within 5%
    of what torch's FLOP counter sees for the same call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    info = adapter.inspect_call((), kwargs)
    # the math backend decomposes attention into matmuls that the counter sees (the CPU flash kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            with adapter.capture(caches, info):
                model(**kwargs)
        dense_counted = counter.get_total_flops() / 2
        idx = torch.arange(0, 64, 4).expand(2, 16)
        with FlopCounterMode(display=False) as counter:
            adapter.pruned_forward(caches, idx, info)
        pruned_counted = counter.get_total_flops() / 2
    assert abs(adapter.macs(info, 64) / dense_counted - 1) < 0.05
    assert abs(adapter.macs(info, 16) / pruned_counted - 1) < 0.05
    assert adapter.macs(info, 16) < adapter.macs(info, 64)


def assert_cfg_rows_share_selection(view):
    """``view`` (``catprune.inspect``) after a generation of 2 samples with CFG (rows 0, 1 and their other CFG rows
    2, 3) under ``cfg="shared"``: each sample's two rows had the same selection at every pruned step and share the
    next one."""
    idx = view.next_selection
    assert torch.equal(idx[0], idx[2]) and torch.equal(idx[1], idx[3])
    assert view.cfg_shared
    for record in view.steps:
        if record.kind == "pruned":  # every pruned step computed the same tokens for both rows of a sample
            assert torch.equal(record.selected[0], record.selected[2])
            assert torch.equal(record.selected[1], record.selected[3])


def assert_batch_equals_single_and_non_square(pipe, generate, embeds, wide_embeds, rows):
    """A stock pipeline with CAT Pruning applied: a batch of two prompts (``embeds``, seeds 11 and 12) gives each
    image what it gets alone, and a 16x24 batch (``wide_embeds``) runs with ``rows`` transformer rows and 8 x 12
    image tokens."""
    import catprune

    both = generate(pipe, embeds, [11, 12])
    for row, seed in enumerate([11, 12]):
        alone = generate(pipe, {k: v[row : row + 1] for k, v in embeds.items()}, [seed])
        assert torch.allclose(both[row : row + 1], alone, atol=1e-4)
    wide = generate(pipe, wide_embeds, [3, 4], height=16, width=24)
    assert wide.shape == (2, 3, 16, 24) and torch.isfinite(wide).all()
    assert catprune.stats(pipe).steps[-1].rows == rows
    assert catprune.stats(pipe).steps[-1].tokens == 8 * 12


def assert_stock_pipeline_contract(pipe, generate, embeds, config, late_start=9):
    """The start of a stock pipeline's contract, one image of seed 1: keep ratio 1 and a start step no generation
    reaches (``late_start``) give the dense image bit for bit; ``config`` applied, the image is finite, differs and
    is the same again in a new generation. Returns ``(dense, pruned)``; ``config`` stays applied for the family's
    own checks."""
    import catprune
    from catprune import CATConfig

    dense = generate(pipe, embeds, [1])
    with catprune.applied(pipe, CATConfig(keep_ratio=1.0)):
        assert torch.equal(generate(pipe, embeds, [1]), dense)
    with catprune.applied(pipe, CATConfig(keep_ratio=0.3, start_step=late_start)):
        assert torch.equal(generate(pipe, embeds, [1]), dense)
    catprune.apply(pipe, config)
    pruned = generate(pipe, embeds, [1])
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, dense)
    assert torch.equal(generate(pipe, embeds, [1]), pruned)  # a new generation resets the state
    return dense, pruned
