"""The routing task builder: gate patterns, data and the paper's loss normalisation."""

import numpy as np
import pytest

import fastrace as fr
from fastrace.tasks import routing_gate


@pytest.mark.parametrize("M, K", [(7, 4), (10, 1), (10, 10), (5, 3)])
def test_gate_patterns(M, K):
    plus = routing_gate(M, K, "k_plus")
    pm = routing_gate(M, K, "k_plus_minus")
    for i in range(M):
        assert set(np.flatnonzero(plus[i])) == {(i + d) % M for d in range(K)}
        lo, hi = -((K - 1) // 2), K // 2
        assert set(np.flatnonzero(pm[i])) == {(i + d) % M for d in range(lo, hi + 1)}
    for g in (plus, pm):  # circulant: K trained outputs per input and inputs per output
        assert (g.sum(axis=1) == K).all() and (g.sum(axis=0) == K).all()
    perm = routing_gate(M, K, "k_plus", permute=True, seed=3)
    again = routing_gate(M, K, "k_plus", permute=True, seed=3)
    assert np.array_equal(perm, again) and (perm.sum(axis=1) == K).all()
    assert sorted(map(tuple, perm.T)) == sorted(map(tuple, plus.T))  # columns permuted


def test_reference_k_plus_minus_matches_the_paper():
    g = routing_gate(7, 4)
    assert np.flatnonzero(g[0]).tolist() == [0, 1, 2, 6]  # i-1 .. i+2 (mod 7)


def test_loss_is_the_papers_sum_of_pair_mean_squared_errors():
    task = fr.tasks.routing(M=5, K=3, hidden=8)
    W = fr.init.gaussian(task.network, 0.5, seed=1)
    X, Y = task.items, task.targets
    expected = 0.0
    for i, j in np.argwhere(task.trained):
        out = W[f"h2->out_{j}"] @ W["h1->h2"] @ W[f"in_{i}->h1"] @ X
        expected += np.mean((out - Y) ** 2)
    assert fr.loss(task.network, task.data, W) == pytest.approx(expected, rel=1e-12)
    assert task.data.n_samples == 5 * 3 * X.shape[1]
    # every pair's outputs and errors, trained or not, from the same weights
    errors = task.pair_errors(W)
    i, j = 0, int(np.flatnonzero(~task.trained[0])[0])
    out = W[f"h2->out_{j}"] @ W["h1->h2"] @ W[f"in_{i}->h1"] @ X
    assert errors[i, j] == pytest.approx(0.5 * np.sum((out - Y) ** 2), rel=1e-12)


def test_custom_items_and_targets():
    items = np.random.default_rng(0).standard_normal((3, 5))
    targets = np.random.default_rng(1).standard_normal((2, 5))
    task = fr.tasks.routing(M=3, K=2, items=items, targets=targets, hidden=4)
    assert task.network.dim("in_0") == 3 and task.network.dim("out_2") == 2
    with pytest.raises(fr.ConfigError, match="items"):
        fr.tasks.routing(M=3, K=2, items=np.ones((3, 4)), targets=targets)


@pytest.mark.parametrize("kwargs, message", [
    ({"M": 0}, "M must be a positive integer"),
    ({"M": 4, "K": 5}, "K must be an integer in 1..M=4"),
    ({"gate": "diagonal"}, "gate must be 'k_plus' or 'k_plus_minus'"),
    ({"hidden": 0}, "hidden must be a positive integer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(fr.ConfigError, match=message):
        fr.tasks.routing(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"M": True, "K": 1}, "M must be a positive integer"),
    ({"M": 3, "K": True}, "K must be an integer in 1..M=3"),
    ({"targets": [["a", "b"]]}, "targets"),
    ({"targets": np.ones((7, 4)) * 1j}, "targets"),
    ({"items": np.ones((4, 4), dtype=object)}, "items"),
])
def test_bools_and_non_numbers_are_refused(kwargs, message):
    with pytest.raises(fr.ConfigError, match=message):
        fr.tasks.routing(**kwargs)
    with pytest.raises(fr.ConfigError, match="permute must be True or False"):
        routing_gate(7, 4, permute="no")


def test_memory_grows_with_the_trained_pairs_not_with_m_cubed():
    # a data set over all M² pairs (M input arrays of M² n_items rows each) is built only
    # when asked for: M = 150 with K = 1 has 600 training samples, not ~1.5 GB of arrays
    import tracemalloc

    tracemalloc.start()
    task = fr.tasks.routing(M=150, K=1, hidden=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert task.data.n_samples == 600 and peak < 100 << 20
    small = fr.tasks.routing(M=3, K=1, hidden=4)
    assert small.all_pairs.n_samples == 9 * 4


def test_a_data_set_too_big_for_memory_is_refused_before_allocation(monkeypatch):
    from fastrace import _memory

    monkeypatch.setattr(_memory, "available_memory", lambda: 1 << 20)
    with pytest.raises(fr.ConfigError, match="GiB"):
        fr.tasks.routing(M=300, K=4, hidden=4)


def test_a_huge_gate_is_refused_with_a_config_error():
    with pytest.raises(fr.ConfigError, match="gate need"):
        routing_gate(10**7, 1)
