"""Layer (b): the read-only view (`catprune.inspect`) and the step observer (`catprune.observe`)."""

import dataclasses

import pytest
import torch

import catprune
from catprune import CATConfig
from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer
from helpers import flow_denoise as denoise


@pytest.fixture
def model():
    return tiny_sd3_transformer()


@pytest.fixture
def inputs(model):
    return tiny_sd3_inputs(model, batch=2, height=8, width=12)


@pytest.mark.parametrize("config", [CATConfig(keep_ratio=1.0), CATConfig(keep_ratio=0.3, start_step=20)])
def test_pruning_off_records_dense_steps_and_stays_bit_identical(model, inputs, config):
    dense = denoise(model, inputs)
    catprune.apply(model, config)
    seen = []
    handle = catprune.observe(model, seen.append)
    assert torch.equal(denoise(model, inputs), dense)
    s = catprune.stats(model)
    assert [r.kind for r in s.steps] == ["dense"] * 6 and [r.step for r in s.steps] == list(range(6))
    assert all(r.computed == r.tokens == 24 and r.macs == r.macs_dense and r.selected is None for r in s.steps)
    assert s.macs_ratio == 1.0 and "6 steps (0 pruned)" in str(s)
    assert [r.step for r in seen] == list(range(6))
    handle.remove()
    assert torch.equal(denoise(model, inputs), dense)  # a second generation starts its own records
    assert len(seen) == 6 and len(catprune.stats(model).steps) == 6


def test_observer_sees_every_step_with_its_selection(model, inputs):
    catprune.apply(model, CATConfig(keep_ratio=0.25, start_step=3))
    seen = []
    with catprune.observe(model, seen.append):
        denoise(model, inputs)
    assert [r.kind for r in seen] == ["dense", "dense", "capture", "pruned", "pruned", "pruned"]
    k = round(0.25 * 24)
    for record in seen:
        if record.kind == "pruned":
            assert record.selected.shape == (2, k) and record.selected.dtype == torch.long
            assert all(len(set(row)) == k for row in record.selected.tolist())
            assert record.macs < record.macs_dense
        else:
            assert record.selected is None and record.macs == record.macs_dense
    denoise(model, inputs)
    assert len(seen) == 6  # removed on leaving the block
    # the records the observer saw are the stats' records, and the selections are the ones the steps computed
    view = catprune.inspect(model)
    assert [r.to_dict() for r in view.steps] == [r.to_dict() for r in seen]
    pairs = zip(view.steps, seen, strict=True)
    assert all(torch.equal(a.selected, b.selected) for a, b in pairs if a.selected is not None)


def test_observer_survives_reapply_and_is_dropped_by_remove(model, inputs):
    seen = []
    catprune.apply(model, CATConfig(keep_ratio=0.5, start_step=2))
    catprune.observe(model, seen.append)
    catprune.apply(model, CATConfig(keep_ratio=0.25, start_step=2))
    denoise(model, inputs, steps=3)
    assert [r.computed for r in seen] == [24, 24, 6]
    catprune.remove(model)
    catprune.apply(model, CATConfig(keep_ratio=0.25, start_step=2))
    denoise(model, inputs, steps=3)
    assert len(seen) == 3


def test_inspect_is_a_frozen_copy(model, inputs):
    catprune.apply(model, CATConfig(keep_ratio=0.25, start_step=2, cfg="per_row"))
    before = catprune.inspect(model)
    assert before.steps == () and before.grid is None and before.cache_bytes == 0 and before.next_selection is None
    denoise(model, inputs, steps=4)
    view = catprune.inspect(model)
    assert view.config == catprune.get_config(model) and view.family.startswith("SD3")
    assert view.grid == (4, 6) and view.batch == 2 and view.cfg_shared is False
    assert view.cache_bytes > 0 and view.kv_cache_shapes == ((2, 2, 24 + 5, 2, 8),) * 2  # (2, B, M + T, H, hd)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.grid = (1, 1)
    view.next_selection.fill_(0)  # a copy: the runtime's selection is untouched
    assert not torch.equal(catprune.inspect(model).next_selection, view.next_selection)
    assert torch.equal(view.selected(3), view.steps[3].selected) and view.selected(0) is None


def test_observe_and_inspect_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="catprune.inspect.*not applied.*catprune.apply"):
        catprune.inspect(model)
    catprune.apply(model)
    with pytest.raises(TypeError, match="callback: expected a callable"):
        catprune.observe(model, 3)
    with pytest.raises(ValueError, match="step_kernels.*capture step"):
        catprune.step_kernels(model)


def test_step_kernels_rerun_selection_and_clustering(model, inputs):
    catprune.apply(model, CATConfig(keep_ratio=0.25, start_step=2, cfg="per_row"))
    denoise(model, inputs, steps=4)
    kernels = catprune.step_kernels(model)
    selection = catprune.inspect(model).next_selection
    assert not kernels.fused and torch.equal(kernels.select(), selection)  # same state: same choice
    labels = kernels.cluster()
    assert labels.shape == (2, 24) and int(labels.max()) < CATConfig().clusters_for(24)
