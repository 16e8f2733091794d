"""Layer (b): config validation and the apply / remove API contract."""

import dataclasses
import inspect

import pytest
import torch

import catprune
from catprune import CATConfig, CFGMode
from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(keep_ratio=0.0), ValueError, ["keep_ratio", "(0, 1]", "0.0"]),
        (dict(keep_ratio=1.5), ValueError, ["keep_ratio", "1.5"]),
        (dict(keep_ratio="0.3"), TypeError, ["keep_ratio", "str"]),
        (dict(start_step=1), ValueError, ["start_step", ">= 2", "1"]),
        (dict(start_step=2.0), TypeError, ["start_step", "float"]),
        (dict(num_clusters=0), ValueError, ["num_clusters", ">= 1"]),
        (dict(num_clusters=2.5), TypeError, ["num_clusters"]),
        (dict(staleness_decay=1.0), ValueError, ["staleness_decay", "[0, 1)"]),
        (dict(magnitude_share=-0.1), ValueError, ["magnitude_share"]),
        (dict(cluster_feature_weight=-1), ValueError, ["cluster_feature_weight"]),
        (dict(kmeans_iters=0), ValueError, ["kmeans_iters"]),
        (dict(cluster_share_weights=()), TypeError, ["cluster_share_weights"]),
        (dict(cluster_share_weights=(3, 0)), ValueError, ["cluster_share_weights"]),
        (dict(cfg="both"), ValueError, ["cfg", "'auto'"]),
        (dict(seed=-1), ValueError, ["seed"]),
        (dict(seed=True), TypeError, ["seed", "bool"]),
    ],
)
def test_config_rejects_bad_values_with_clear_messages(kwargs, error, words):
    with pytest.raises(error) as excinfo:
        CATConfig(**kwargs)
    message = str(excinfo.value)
    for word in words:
        assert word in message
    assert "expected" in message and "got" in message


def test_config_defaults_and_derived_values():
    cfg = CATConfig()
    assert (cfg.keep_ratio, cfg.start_step, cfg.staleness_decay, cfg.magnitude_share) == (0.3, 8, 0.5, 0.25)
    assert cfg.tokens_kept(4096) == 1229
    assert cfg.clusters_for(4096) == 20 and cfg.clusters_for(1024) == 5 and cfg.clusters_for(16) == 2
    assert cfg.clusters_for(1) == 1
    assert CATConfig(cfg="per_row").cfg is CFGMode.PER_ROW
    assert not CATConfig(keep_ratio=1).pruning_enabled
    with pytest.raises(ValueError, match="num_clusters"):
        CATConfig(num_clusters=50).clusters_for(16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keep_ratio = 0.5
    assert CATConfig(**{**cfg.to_dict(), "cfg": "auto"}) == cfg


# ---------------------------------------------------------------- apply / remove
def _state(model):
    return {
        "dict_keys": sorted(model.__dict__.keys()),
        "forward_hooks": [len(m._forward_hooks) for m in model.modules()],
        "pre_hooks": [len(m._forward_pre_hooks) for m in model.modules()],
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "attrs": [sorted(vars(m).keys()) for m in model.modules()],
    }


def _same_state(a, b):
    return (
        a["dict_keys"] == b["dict_keys"]
        and a["forward_hooks"] == b["forward_hooks"]
        and a["pre_hooks"] == b["pre_hooks"]
        and a["attrs"] == b["attrs"]
        and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    )


def test_apply_remove_leaves_no_trace_and_preserves_signature():
    model = tiny_sd3_transformer()
    before = _state(model)
    signature = inspect.signature(model.forward)
    catprune.apply(model, CATConfig(keep_ratio=0.5, start_step=2))
    assert catprune.is_applied(model)
    assert inspect.signature(model.forward) == signature
    catprune.remove(model)
    assert not catprune.is_applied(model)
    assert "forward" not in model.__dict__
    assert _same_state(before, _state(model))


def test_apply_is_idempotent_and_replaces_config():
    model = tiny_sd3_transformer()
    catprune.apply(model, CATConfig(keep_ratio=0.5))
    catprune.apply(model, CATConfig(keep_ratio=0.25))
    assert catprune.get_config(model).keep_ratio == 0.25
    catprune.remove(model)
    assert "forward" not in model.__dict__  # one remove undoes both applies


def test_remove_on_unpatched_model_is_noop():
    model = tiny_sd3_transformer()
    before = _state(model)
    assert catprune.remove(model) is model
    assert _same_state(before, _state(model))


def test_applied_context_manager_restores_previous_state():
    model = tiny_sd3_transformer()
    with catprune.applied(model, CATConfig(keep_ratio=0.5)):
        assert catprune.get_config(model).keep_ratio == 0.5
    assert not catprune.is_applied(model)
    catprune.apply(model, CATConfig(keep_ratio=0.7))
    with catprune.applied(model, CATConfig(keep_ratio=0.2)):
        assert catprune.get_config(model).keep_ratio == 0.2
    assert catprune.get_config(model).keep_ratio == 0.7


def test_apply_does_not_mutate_user_config():
    cfg = CATConfig(keep_ratio=0.4)
    model = catprune.apply(tiny_sd3_transformer(), cfg)
    assert catprune.get_config(model) is cfg and cfg.keep_ratio == 0.4


def test_unsupported_model_names_class_and_supported_ones():
    with pytest.raises(TypeError) as excinfo:
        catprune.apply(torch.nn.Linear(2, 2))
    message = str(excinfo.value)
    assert "Linear" in message and "SD3Transformer2DModel" in message


def test_bad_argument_types():
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        catprune.apply("not a model")
    with pytest.raises(TypeError, match="config"):
        catprune.apply(tiny_sd3_transformer(), {"keep_ratio": 0.3})
    with pytest.raises(ValueError, match="not applied"):
        catprune.stats(tiny_sd3_transformer())


def test_unsupported_attention_processor_is_rejected_before_modifying():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_sd3_transformer()
    model.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="JointAttnProcessor2_0"):
        catprune.apply(model)
    assert not catprune.is_applied(model)


def test_call_time_errors_leave_state_untouched():
    model = tiny_sd3_transformer()
    catprune.apply(model, CATConfig(keep_ratio=0.5, start_step=2, num_clusters=10))
    inputs = tiny_sd3_inputs(model, batch=1, height=4, width=4)  # 4 tokens < 10 clusters
    with torch.no_grad(), pytest.raises(ValueError, match="num_clusters"):
        model(**inputs, timestep=torch.tensor([900.0]))
    assert catprune.stats(model).steps == []
    odd = tiny_sd3_inputs(model, batch=1, height=5, width=4)
    with torch.no_grad(), pytest.raises(ValueError, match="divisible by the patch size"):
        model(**odd, timestep=torch.tensor([900.0]))
    big = tiny_sd3_inputs(model, batch=1, height=40, width=4)
    with torch.no_grad(), pytest.raises(ValueError, match="pos_embed_max_size"):
        model(**big, timestep=torch.tensor([900.0]))
    cpu_model = tiny_sd3_transformer()
    with pytest.raises(ValueError, match=r"CATConfig.backend: 'cudagraph' .* needs a model on CUDA"):
        catprune.apply(cpu_model, CATConfig(keep_ratio=0.5, backend="cudagraph"))  # refused at apply time
    assert not catprune.is_applied(cpu_model)
    if torch.cuda.is_available():  # device hidden at apply time (an offload hook): refused at the first call
        graphs = tiny_sd3_transformer()
        graphs._hf_hook = None
        catprune.apply(graphs, CATConfig(keep_ratio=0.5, backend="cudagraph"))
        with torch.no_grad(), pytest.raises(ValueError, match="needs CUDA inputs"):
            graphs(**tiny_sd3_inputs(graphs, batch=1), timestep=torch.tensor([900.0]))
        assert catprune.stats(graphs).steps == []
    model2 = catprune.apply(tiny_sd3_transformer(), CATConfig(keep_ratio=0.5, cfg="shared"))
    with torch.no_grad(), pytest.raises(ValueError, match="even batch"):
        model2(**tiny_sd3_inputs(model2, batch=3), timestep=torch.full((3,), 900.0))


def test_stats_and_reset():
    model = catprune.apply(tiny_sd3_transformer(), CATConfig(keep_ratio=0.25, start_step=2))
    inputs = tiny_sd3_inputs(model, batch=2, height=8, width=8)
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0):
            model(**inputs, timestep=torch.full((2,), t))
    s = catprune.stats(model)
    assert [r.phase for r in s.steps] == ["dense", "capture", "pruned", "pruned"]
    assert [r.computed for r in s.steps] == [16, 16, 4, 4]
    assert s.steps[2].macs < s.steps[2].macs_dense and 0 < s.macs_ratio < 1
    assert "2 pruned" in str(s)
    catprune.reset(model)
    with torch.no_grad():
        model(**inputs, timestep=torch.full((2,), 500.0))  # after reset: step 0 although t decreased
    assert [r.phase for r in catprune.stats(model).steps] == ["dense"]


def test_user_torch_compile_wrapper_works_without_recompiles():
    """`torch.compile(transformer)` as users write it: catprune sees through it, Dynamo never traces the stateful
    wrapper (no recompile per step), outputs equal the eager CAT ones, and remove restores the module."""
    from torch._dynamo.utils import counters

    model = tiny_sd3_transformer(num_layers=1)
    inputs = tiny_sd3_inputs(model, batch=2, height=8, width=8)
    config = CATConfig(keep_ratio=0.3, start_step=2)

    def run(m):
        with torch.no_grad():
            return [m(**inputs, timestep=torch.full((2,), t), return_dict=False)[0] for t in (900.0, 700.0, 500.0, 300.0)]

    catprune.apply(model, config)
    reference = run(model)
    catprune.remove(model)
    compiled = torch.compile(model)
    counters.clear()
    with pytest.warns(UserWarning, match="backend='compile'"):
        catprune.apply(compiled, config)
    got = run(compiled)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, reference, strict=True))
    assert counters["stats"].get("unique_graphs", 0) == 0
    assert [r.phase for r in catprune.stats(compiled).steps] == ["dense", "capture", "pruned", "pruned"]
    catprune.remove(compiled)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("hook_first", [True, False])
def test_survives_accelerate_hook_resets(hook_first):
    """diffusers' enable_model_cpu_offload installs accelerate hooks and re-installs them after every generation
    (remove_hook_from_module + add_hook_to_module); CAT must stay applied through that, and remove must undo it."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_sd3_transformer(num_layers=1)
    inputs = tiny_sd3_inputs(model, batch=1, height=8, width=8)

    def run():
        with torch.no_grad():
            return [model(**inputs, timestep=torch.tensor([t]), return_dict=False)[0] for t in (900.0, 700.0, 500.0)]

    dense = run()
    config = CATConfig(keep_ratio=0.3, start_step=2)
    if hook_first:
        hooks.add_hook_to_module(model, hooks.ModelHook())
        catprune.apply(model, config)
    else:
        catprune.apply(model, config)
        hooks.add_hook_to_module(model, hooks.ModelHook())
    first = run()
    hooks.remove_hook_from_module(model)  # what diffusers' maybe_free_model_hooks does between generations
    hooks.add_hook_to_module(model, hooks.ModelHook())
    assert catprune.is_applied(model)
    second = run()
    assert [r.phase for r in catprune.stats(model).steps] == ["dense", "capture", "pruned"]
    assert torch.equal(first[-1], second[-1]) and not torch.equal(second[-1], dense[-1])
    catprune.remove(model)
    assert not catprune.is_applied(model)
    assert all(torch.equal(a, b) for a, b in zip(run(), dense, strict=True))


def test_top_level_load_pipeline_loads_the_embedded_model():
    pipe = catprune.load_pipeline("shapes")
    assert type(pipe).__name__ == "ShapesPipeline" and pipe.transformer.config.patch_size == 4
    with pytest.raises(TypeError, match="name_or_path"):
        catprune.load_pipeline(3)
