"""Layer (c): the equivalence contract, once, over every model family and variant (tiny random models, CPU, fp32).

The families come from `catprune.families.FAMILIES`; each record's tiny harness (`catprune.models.testing`) builds
the model and its inputs and runs a sampling loop as the family's pipeline calls the transformer. Family-specific
cases stay in ``test_<family>.py``.
"""

import inspect
import logging

import pytest
import torch

import catprune
from catprune import Backend, CATConfig
from catprune.adapters import BufferStore, adapter_for
from catprune.families import FAMILIES, load
from catprune.runtime import StepRunner

STEPS = 6


def test_every_record_resolves():
    from catprune.bench.families import FAMILIES as BENCH
    from catprune.models import model_configs

    configs = model_configs()
    for record in FAMILIES:
        tiny = load(record.tiny)()
        model = tiny.transformer()
        assert type(adapter_for(model)) is load(record.adapter)
        assert type(model).__name__ == record.transformer_class
        assert BENCH[record.transformer_class] is load(record.bench)
        assert [p for p in record.presets if p in configs], record.presets  # at least one full-size preset
        assert all(configs[p]["class"] == record.transformer_class for p in record.presets if p in configs)


def test_pruning_off_is_bit_identical_and_still_recorded(case):
    tiny, model, inputs = case
    dense = tiny.denoise(model, inputs, STEPS)
    for config in (CATConfig(keep_ratio=1.0), CATConfig(keep_ratio=0.3, start_step=20)):
        catprune.apply(model, config)
        assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
        s = catprune.stats(model)
        assert [r.kind for r in s.steps] == ["dense"] * STEPS and s.macs_ratio == 1.0
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=STEPS))  # start_step >= steps: the last step captures
    assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
    s = catprune.stats(model)
    assert [r.kind for r in s.steps] == ["dense"] * (STEPS - 1) + ["capture"] and s.macs_ratio == 1.0


def test_apply_then_remove_is_bit_identical_and_leaves_no_trace(case):
    tiny, model, inputs = case
    signature = inspect.signature(model.forward)
    attributes = set(model.__dict__)
    processors = dict(model.attn_processors)
    dense = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3))
    assert inspect.signature(model.forward) == signature
    tiny.denoise(model, inputs, STEPS)
    catprune.remove(model)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
    assert set(model.__dict__) == attributes and "forward" not in model.__dict__
    after = model.attn_processors
    assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not catprune.is_applied(model)


def test_pruning_on_differs_is_finite_close_and_repeatable(case):
    tiny, model, inputs = case
    dense = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3))
    first = tiny.denoise(model, inputs, STEPS)
    second = tiny.denoise(model, inputs, STEPS)  # state reset between generations
    assert torch.isfinite(first).all()
    assert not torch.equal(first, dense)
    assert torch.equal(first, second)
    # close to dense, far closer than to an unrelated sample
    assert (first - dense).abs().mean() < 0.25 * (dense - dense.roll(1, dims=0)).abs().mean()


def test_realised_kept_tokens_match_config(case):
    tiny, model, inputs = case
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3))
    tiny.denoise(model, inputs, STEPS)
    view = catprune.inspect(model)
    m, k = 4 * 6, round(0.3 * 24)
    assert view.grid == (4, 6) and view.batch == 2
    assert [r.kind for r in view.steps] == ["dense"] * 2 + ["capture"] + ["pruned"] * (STEPS - 3)
    assert all(r.tokens == m and r.rows == 2 for r in view.steps)
    for r in view.steps:
        if r.kind == "pruned":
            assert r.computed == k and r.selected.shape == (2, k) and r.macs < r.macs_dense
            assert all(len(set(row)) == k and max(row) < m for row in r.selected.tolist())
        else:
            assert r.computed == m and r.selected is None and r.macs == r.macs_dense
    assert view.next_selection.shape == (2, k)
    assert len(view.kv_cache_shapes) >= adapter_for(model).num_caches()  # SD3.5's dual attention: two per block
    assert all(s[:2] == (2, 2) and s[2] >= m for s in view.kv_cache_shapes)  # (2, B, M [+ T], H, hd)
    assert view.cache_bytes > 0


def test_batch_of_two_equals_each_sample_alone(case):
    tiny, model, inputs = case
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, cfg="per_row"))
    both = tiny.denoise(model, inputs, STEPS)
    selection = catprune.inspect(model).next_selection
    assert not torch.equal(selection[0], selection[1])  # the rows really select different tokens
    for i in range(2):
        alone = tiny.denoise(model, tiny.row(inputs, i), STEPS)
        assert torch.allclose(both[i : i + 1], alone, atol=1e-4), (both[i] - alone[0]).abs().max()


def test_full_selection_pruned_step_equals_dense_step(case):
    """Eager semantics of the pruned path: with every token selected it is the dense forward."""
    tiny, model, inputs = case
    adapter = adapter_for(model)
    kwargs = tiny.call_kwargs(model, inputs, 500.0)
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore() for _ in range(adapter.num_caches())]
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        assert all(not m._forward_hooks for m in model.modules())  # capture leaves no hooks
        idx = torch.arange(info.num_tokens).flip(0).expand(2, -1)  # every token, in another order
        tokens = adapter.pruned_forward(caches, idx, info)  # (B, M, P) in idx order
    full = torch.empty_like(tokens).scatter_(1, idx[..., None].expand_as(tokens), tokens)  # (B, M, P) in raster order
    rebuilt = adapter.build_output(full, info)[0]
    assert torch.allclose(rebuilt, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.build_output(adapter.output_tokens((dense,), info), info)[0], dense)


def test_static_functions_match_the_eager_paths(case):
    """dense_fn / pruned_fn over fast_inputs (what compile and CUDA graphs run) equal the eager calls."""
    tiny, model, inputs = case
    adapter = adapter_for(model)
    kwargs = tiny.call_kwargs(model, inputs, 500.0)
    info = adapter.inspect_call((), kwargs)
    fast = adapter.fast_inputs(info)
    caches = [BufferStore() for _ in range(adapter.num_caches())]
    idx = torch.tensor([[0, 5, 7, 11, 20], [1, 2, 3, 17, 23]])
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        assert torch.equal(adapter.dense_fn(model.forward)(**fast), dense)
        static = adapter.pruned_fn(caches, info)(idx=idx, **fast)
        eager = adapter.pruned_forward(caches, idx, info)
    assert static.shape == (2, 5, adapter.output_tokens((dense,), info).shape[-1])
    assert torch.equal(static, eager)


@pytest.mark.parametrize("selection", ["cat", "ras", "staleness", "drift"])
def test_fused_step_logic_matches_unfused(case, selection):
    """The graph backends replay one fused step (pruned forward + scatter + staleness + next selection) over
    persistent buffers; the eager fused runner runs that same function, and it equals the unfused eager path."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.3, start_step=3, selection=selection)
    catprune.apply(model, config)
    unfused = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, config, runner=StepRunner(Backend.EAGER, fuse=True))
    fused = tiny.denoise(model, inputs, STEPS)
    assert torch.equal(fused, unfused)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), fused)  # persistent buffers are reset between generations


class _TracingRunner(StepRunner):
    """The eager fused runner with the selection traced by dynamo as a compile backend would (whole function, no
    graph break: ``fullgraph``; backend ``eager``: no code generation), recording the keys it is asked for."""

    def __init__(self):
        super().__init__(Backend.EAGER, fuse=True)
        self.keys = []

    def compiled(self, key, make_fn):
        self.keys.append(key)
        if key[0] != "select":
            return super().compiled(key, make_fn)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(make_fn(), backend="eager", fullgraph=True)
        return self._compiled[key]


@pytest.mark.parametrize("selection", ["cat", "no_clustering", "staleness", "magnitude", "ras", "drift"])
def test_selection_runs_through_the_runner_and_traces_whole(case, selection):
    """On the compile backends the next step's selection is one compiled function per k (`StepRunner.compiled`,
    key ``("select", signature, k)``); traced whole, it chooses the same tokens as the eager rule."""
    tiny, model, inputs = case
    torch._dynamo.reset()  # one trace per rule in this process, far from the recompile limit
    config = CATConfig(keep_ratio=0.3, start_step=3, selection=selection)
    catprune.apply(model, config)
    eager = tiny.denoise(model, inputs, STEPS)
    runner = _TracingRunner()
    catprune.apply(model, config, runner=runner)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), eager)
    select_keys = [key for key in runner.keys if key[0] == "select"]
    k = catprune.stats(model).steps[-1].computed
    assert select_keys and all(key[2] == k for key in select_keys)


def test_a_keep_ratio_schedule_runs_every_k_compiled(monkeypatch):
    """A schedule has one k per pruned step, each a new compiled version of the same functions; more of them than
    torch.compile's recompile limit (8 by default; 2 here, to keep the test short) still all run compiled
    (`runtime.backends.with_recompile_room`)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))  # tracing, no codegen
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    hits = []

    class Hits(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                hits.append(record.getMessage())

    handler, dynamo_log = Hits(), logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    tiny = load(FAMILIES[0].tiny)()
    model = tiny.transformer()
    try:
        catprune.apply(model, CATConfig(keep_ratio=0.1, keep_ratio_end=0.9, start_step=2, backend="compile"))
        tiny.denoise(model, tiny.inputs(model, batch=2, height=16, width=16), 6)
    finally:
        dynamo_log.removeHandler(handler)
    ks = {r.computed for r in catprune.stats(model).steps if r.phase == "pruned"}
    assert len(ks) > 2 and not hits


def test_size_and_batch_changes_start_a_new_generation(case):
    tiny, model, inputs = case
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2))
    a = tiny.denoise(model, inputs, 4)
    b = tiny.denoise(model, tiny.inputs(model, batch=3, height=12, width=6), 4)
    c = tiny.denoise(model, inputs, 4)
    assert torch.isfinite(b).all()
    assert b.shape == tiny.inputs(model, batch=3, height=12, width=6)["hidden_states"].shape
    assert torch.equal(a, c)
    assert catprune.inspect(model).grid == (4, 6) and catprune.stats(model).steps[-1].tokens == 24
