"""Layer (a): the pure algorithm, with hand-computed values and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catprune.algorithm import (
    as_words,
    cluster_features,
    cluster_quotas,
    cluster_scores,
    copy_tokens_,
    gather_tokens,
    grid_positions,
    kmeans,
    scatter_tokens_,
    select_tokens,
    token_change,
    token_mask,
    update_age,
    update_staleness,
)


def test_gather_scatter_roundtrip_per_sample():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    g = gather_tokens(x, idx)
    assert g.shape == (2, 2, 3)
    assert g[0, 0].tolist() == x[0, 3].tolist() and g[1, 1].tolist() == x[1, 2].tolist()
    dst = torch.zeros_like(x)
    scatter_tokens_(dst, idx, g)
    assert torch.equal(dst[0, 3], x[0, 3]) and torch.equal(dst[1, 1], x[1, 1])
    assert dst[0, 1].abs().sum() == 0 and dst[1, 0].abs().sum() == 0


def test_gather_scatter_4d_heads():
    x = torch.randn(2, 5, 3, 4)  # (B, M, H, hd)
    idx = torch.tensor([[4, 1], [0, 3]])
    dst = torch.zeros_like(x)
    scatter_tokens_(dst, idx, gather_tokens(x, idx))
    assert torch.equal(dst[1, 3], x[1, 3]) and dst[1, 1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scatter_and_copy_as_words_equal_the_elementwise_ops(dtype):
    """The 64-bit-word path moves exactly the bytes of the elementwise one, on slices of a joint K/V cache (image
    rows first, text tail) and on strided sources where it falls back."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 3, 10 + 4, 2, 8, generator=gen).to(dtype)  # (2, B, M + T, H, hd)
    fresh, text = torch.randn(3, 5, 2, 8, generator=gen).to(dtype), torch.randn(3, 4, 2, 8, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(10, generator=gen)[:5] for _ in range(3)])  # (B, k) per-sample, unique
    expected = cache.clone()
    expected[1, :, :10].scatter_(1, idx[:, :, None, None].expand(3, 5, 2, 8), fresh)
    expected[1, :, 10:].copy_(text)
    got = cache.clone()
    assert (as_words(got[1, :, :10], fresh) is None) == (dtype == torch.float64)  # 8-byte elements stay as they are
    scatter_tokens_(got[1, :, :10], idx, fresh)
    copy_tokens_(got[1, :, 10:], text)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    strided = fresh.transpose(2, 3).contiguous().transpose(2, 3)  # last dim not contiguous: the elementwise op
    assert as_words(strided) is None and torch.equal(strided, fresh)
    target = cache[0, :, :10].clone()
    assert torch.equal(
        scatter_tokens_(target, idx, strided),
        expected[1, :, :10]
        .clone()
        .copy_(cache[0, :, :10])
        .scatter_(1, idx[:, :, None, None].expand(3, 5, 2, 8), fresh),
    )
    assert as_words(cache[0, :, :10, :, 1:]) is None  # a row of 7 elements: not whole words


def test_token_mask():
    assert token_mask(torch.tensor([[1, 3]]), 4).tolist() == [[False, True, False, True]]


def test_token_change_hand_computed():
    out = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    assert token_change(out, ref).tolist() == [[5.0, 1.0]]


def test_cluster_scores_hand_computed():
    delta = torch.tensor([[[1.0, -3.0], [2.0, 1.0], [0.0, 0.5], [-4.0, 0.0]]])
    labels = torch.tensor([[0, 0, 1, 2]])
    got = cluster_scores(delta, labels, 4)
    # cluster 0: max |.| per channel = (2, 3) -> sqrt(13); cluster 1: (0, .5); cluster 2: (4, 0); cluster 3 empty
    assert torch.allclose(got, torch.tensor([[math.sqrt(13), 0.5, 4.0, 0.0]]))


def test_update_staleness_and_age():
    f = torch.tensor([[1.0, 0.5, 0.0]])
    assert update_staleness(f, torch.tensor([[2]]), 0.5).tolist() == [[0.5, 0.25, 1.0]]
    assert update_age(torch.tensor([[2, 0, 5]]), torch.tensor([[2]])).tolist() == [[3, 1, 0]]


def test_cluster_quotas_sum_and_order():
    assert cluster_quotas(10, 4, (3, 2, 1)) == [5, 3, 1, 1]
    assert cluster_quotas(6, 2, (3, 2, 1)) == [4, 2]
    assert cluster_quotas(0, 3, (3, 2, 1)) == [0, 0, 0]
    q = cluster_quotas(307, 20, (3, 2, 1))
    assert sum(q) == 307 and q[0] >= q[1] >= q[2] and q[2] == q[-1] or q[2] == q[-1] + 1


def test_grid_positions_and_features():
    pos = grid_positions(2, 3)
    assert pos.shape == (6, 2)
    assert pos[4].tolist() == [0.5, pytest.approx(1 / 3)]
    feats = cluster_features(torch.ones(1, 6, 2), (2, 3), 0.05)
    assert feats.shape == (1, 6, 4) and torch.allclose(feats[0, :, :2], torch.full((6, 2), 0.05))


def test_kmeans_separates_obvious_groups_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 20, 2, generator=g) * 0.1
    b = torch.randn(1, 20, 2, generator=g) * 0.1 + 10
    x = torch.cat([a, b], dim=1)
    labels = kmeans(x, 2, iters=5, seed=3)
    assert labels.shape == (1, 40)
    assert len(set(labels[0, :20].tolist())) == 1 and len(set(labels[0, 20:].tolist())) == 1
    assert labels[0, 0] != labels[0, 20]
    assert torch.equal(labels, kmeans(x, 2, iters=5, seed=3))


def test_kmeans_batch_invariant():
    x = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(1))
    together = kmeans(x, 5, seed=7)
    for s in range(3):
        assert torch.equal(together[s], kmeans(x[s : s + 1], 5, seed=7)[0])


def test_kmeans_spatial_clusters_are_compact():
    feats = cluster_features(torch.zeros(1, 64, 4), (8, 8), 0.05)  # output carries no signal: purely spatial
    labels = kmeans(feats, 4, iters=10, seed=0)[0].view(8, 8)
    # every cluster is a connected-ish region: its bounding box covers at most half the grid
    for c in labels.unique():
        rows, cols = (labels == c).nonzero(as_tuple=True)
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) <= 40


def test_kmeans_rejects_bad_cluster_count():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.zeros(1, 4, 2), 5)


def test_select_first_selection_takes_top_cluster_scores():
    # all-zero staleness: selection is the largest-score tokens, cluster-aware
    score = torch.tensor([[0.0, 9.0, 1.0, 0.0, 5.0, 0.1]])
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    cs = torch.tensor([[9.0, 1.0, 5.0]])
    idx = select_tokens(score, cs, labels, torch.zeros(1, 6), 3, 1.0)
    # quotas 3:2:1 of 3 -> [2, 1, 0] by rank: cluster 0 (rank 0) gives both its tokens, cluster 2 its best, cluster 1
    # (rank 2) nothing, although its token 2 scores higher than token 0
    assert idx.tolist() == [[0, 1, 4]]


def test_select_staleness_part_prefers_stale_tokens():
    score = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    labels = torch.zeros(1, 4, dtype=torch.long)
    f = torch.tensor([[1.0, 1.0, 0.0, 0.5]])
    # rho = 0: everything by staleness -> the two lowest f: tokens 2 (0.0) and 3 (0.5)
    assert select_tokens(score, torch.ones(1, 1), labels, f, 2, 0.0).tolist() == [[2, 3]]
    # rho = 0.5 of k=2 -> one magnitude token (token 0, best score), one stalest (token 2)
    assert select_tokens(score, torch.ones(1, 1), labels, f, 2, 0.5).tolist() == [[0, 2]]


def test_select_age_breaks_staleness_ties():
    score = torch.tensor([[9.0, 1.0, 1.0]])
    labels = torch.zeros(1, 3, dtype=torch.long)
    f = torch.zeros(1, 3)
    age = torch.tensor([[0, 1, 4]])
    assert select_tokens(score, torch.ones(1, 1), labels, f, 1, 0.0, age=age).tolist() == [[2]]
    assert select_tokens(score, torch.ones(1, 1), labels, f, 1, 0.0).tolist() == [[0]]


def test_select_is_per_sample():
    score = torch.tensor([[9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    labels = torch.zeros(2, 4, dtype=torch.long)
    idx = select_tokens(score, torch.ones(2, 1), labels, torch.zeros(2, 4), 1, 1.0)
    assert idx.tolist() == [[0], [3]]


@settings(max_examples=60, deadline=None)
@given(
    s=st.integers(1, 3),
    m=st.integers(1, 60),
    data=st.data(),
)
def test_select_exactly_k_unique_in_range(s, m, data):
    k = data.draw(st.integers(1, m))
    c = data.draw(st.integers(1, m))
    rho = data.draw(st.floats(0, 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(s, m, generator=g)
    if data.draw(st.booleans()):
        score = (score * 3).round()  # many ties
    labels = torch.randint(0, c, (s, m), generator=g)
    f = (torch.rand(s, m, generator=g) * 2).round() / 2
    age = torch.randint(0, 5, (s, m), generator=g)
    idx = select_tokens(score, torch.rand(s, c, generator=g), labels, f, k, rho, age=age)
    assert idx.shape == (s, k) and idx.dtype == torch.long
    for row in idx.tolist():
        assert len(set(row)) == k and all(0 <= j < m for j in row) and row == sorted(row)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(4, 64),
    data=st.data(),
)
def test_every_token_recomputed_within_bound(m, data):
    """Refresh guarantee: with s = k - round(rho k) staleness picks per step, every token is recomputed at least
    once in every window of ceil(M / s) + L + 1 steps, L = ceil(log(1 - gamma) / log(gamma)) (1 for gamma = 0)."""
    k = data.draw(st.integers(1, m))
    rho = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    gamma = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
    c = data.draw(st.integers(1, min(m, 8)))
    staleness_picks = k - round(rho * k)
    if staleness_picks < 1:
        return
    lag = math.ceil(math.log(1 - gamma) / math.log(gamma)) if gamma > 0 else 1
    bound = math.ceil(m / staleness_picks) + lag + 1
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    labels = torch.randint(0, c, (1, m), generator=g)
    f = torch.zeros(1, m)
    age = torch.zeros(1, m, dtype=torch.long)
    for _ in range(3 * bound + 5):
        idx = select_tokens(torch.rand(1, m, generator=g), torch.rand(1, c, generator=g), labels, f, k, rho, age=age)
        f = update_staleness(f, idx, gamma)
        age = update_age(age, idx)
        assert int(age.max()) < bound


def test_topk_and_ras_priority():
    from catprune.algorithm import ras_priority, topk_tokens

    assert topk_tokens(torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]), 2).tolist() == [[0, 2], [1, 2]]
    out = torch.tensor([[[0.0, 2.0], [0.0, 2.0]]])
    boosted = ras_priority(out, torch.tensor([[0, 10]]), 0.1)
    assert boosted[0, 1] == pytest.approx(boosted[0, 0] * math.exp(1.0))


def test_forecast_ratio_extrapolation_and_time_bookkeeping_by_hand():
    from catprune.algorithm import advance_kv_, advance_times_, extrapolate_, forecast_ratio_

    t1 = torch.tensor([[800.0, 800.0, 600.0]])  # (B, M): token 2 computed more recently
    t0 = torch.tensor([[900.0, 800.0, 700.0]])  # token 1 has no slope yet
    ratio = forecast_ratio_(torch.empty(1, 3), torch.tensor([500.0]), t1, t0)
    assert ratio.tolist() == [[3.0, 0.0, 1.0]]  # (500 - 800) / (800 - 900), none, (500 - 600) / (600 - 700)
    capped = forecast_ratio_(torch.empty(1, 3), torch.tensor([500.0]), t1, t0, torch.tensor([[2]]), max_ratio=2.0)
    assert capped.tolist() == [[2.0, 0.0, 0.0]]  # capped at 2; token 2 selected: its fresh value
    k1 = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1, 1).expand(2, 1, 3, 1, 1).clone()  # (2, B, M, H, hd)
    k0 = torch.zeros_like(k1)
    out = extrapolate_(torch.empty_like(k1), k1, k0, capped)
    assert out[0].flatten().tolist() == [3.0, 2.0, 3.0] and torch.equal(out[0], out[1])
    fresh = (torch.full((1, 1, 1, 1), 9.0), torch.full((1, 1, 1, 1), 8.0))
    advance_kv_(k1, k0, torch.tensor([[0]]), fresh)
    assert k0[:, 0, :, 0, 0].tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert k1[:, 0, :, 0, 0].tolist() == [[9.0, 2.0, 3.0], [8.0, 2.0, 3.0]]
    advance_times_(t1, t0, torch.tensor([[0]]), torch.tensor([500.0]))
    assert t1.tolist() == [[500.0, 800.0, 600.0]] and t0.tolist() == [[800.0, 800.0, 700.0]]
