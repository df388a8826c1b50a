"""numba-cuda LSH hashing, sort plan and attention in the CUDA simulator, through the public API."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import BackendCase, random_array
from test_lsh_attention import check_against_reference
from test_lsh_hashing import formula_buckets, stable_order

import npsparseattn as nsa

CUDA = BackendCase("lsh_attention", "numba-cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n_buckets", [6, (4, 8)], ids=["6", "4x8"])
def test_buckets_match_the_float64_formula(rng, dtype, n_buckets):
    x = random_array(rng, (2, 19, 8), dtype)
    columns = sum(n_buckets) // 2 if isinstance(n_buckets, tuple) else n_buckets // 2
    rotations = random_array(rng, (8, 2, columns))
    buckets = nsa.lsh_buckets(x, n_buckets, n_hashes=2, rotations=rotations, backend="numba-cuda")
    assert buckets.dtype == np.int32 and buckets.shape == (2, 2, 19)
    np.testing.assert_array_equal(buckets, formula_buckets(x, rotations, n_buckets))


def test_near_ties_are_decided_as_in_float64(rng):
    """Columns 0 and 1 differ by 1e-9 relative: the buckets are those of the float64 product."""
    x = random_array(rng, (40, 16), np.float32)
    rotations = random_array(rng, (16, 2, 4))
    rotations[:, :, 1] = rotations[:, :, 0] * (1 + 1e-9 * rng.choice([-1.0, 1.0], size=(1, 2)))
    expected = formula_buckets(x, rotations, 8)
    assert {0, 1} <= set(np.unique(expected % 4))
    np.testing.assert_array_equal(
        nsa.lsh_buckets(x, 8, n_hashes=2, rotations=rotations, backend="numba-cuda"), expected
    )


def test_ties_go_to_the_first_maximum():
    x = np.array([[1.0, 0.0]], np.float32)
    rotations = np.array([[[1.0, -1.0]], [[0.0, 0.0]]])
    assert nsa.lsh_buckets(x, 4, rotations=rotations, backend="numba-cuda")[0, 0] == 0
    assert nsa.lsh_buckets(-x, 4, rotations=rotations, backend="numba-cuda")[0, 0] == 1


@pytest.mark.parametrize("n_values", [2, 7, 300, 1 << 20], ids=["1-pass", "7", "3-passes", "5-passes"])
def test_sort_is_stable_by_round_bucket_position(rng, n_values):
    buckets = rng.integers(0, n_values, (2, 3, 29))
    order, inverse = nsa.lsh_sort(buckets, backend="numba-cuda")
    assert order.dtype == inverse.dtype == np.int32 and order.shape == (2, 87)
    np.testing.assert_array_equal(order, stable_order(buckets))
    np.testing.assert_array_equal(np.take_along_axis(inverse, order, -1), np.broadcast_to(np.arange(87), (2, 87)))


def test_sort_of_an_empty_sequence():
    order, inverse = nsa.lsh_sort(np.zeros((2, 0), np.int32), backend="numba-cuda")
    assert order.shape == inverse.shape == (0,)


CONFIGS = [
    pytest.param(dict(n_buckets=4, n_hashes=2, chunk_size=8, causal=True), id="2-hashes-causal"),
    pytest.param(dict(n_buckets=(2, 4), chunk_size=12, chunks_before=1, chunks_after=1), id="window-wraps-itself"),
    pytest.param(
        dict(n_buckets=2, n_hashes=2, chunk_size=4, chunks_before=2, exclude_self=False, causal=True),
        id="keep-self-chunk-4-before-2",
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_attention_matches_reference(rng, config):
    qk, v = random_array(rng, (1, 24, 8), np.float32), random_array(rng, (1, 24, 5), np.float32)
    check_against_reference(qk, v, dict(seed=5, **config), np.float32, CUDA)


def test_attention_float16_two_heads(rng):
    qk, v = random_array(rng, (2, 16, 8), np.float16), random_array(rng, (2, 16, 8), np.float16)
    check_against_reference(qk, v, dict(n_buckets=4, n_hashes=2, chunk_size=8, seed=2), np.float16, CUDA)


def test_tokens_that_see_only_themselves(rng):
    """Causal, one-slot chunks, no neighbours: a token sees itself at -1e5 (lse near -1e5) and its rounds' peers."""
    qk, v = random_array(rng, (1, 8, 4), np.float32), random_array(rng, (1, 8, 4), np.float32)
    kw = dict(n_buckets=2, n_hashes=2, chunk_size=1, chunks_before=0, causal=True, seed=0)
    check_against_reference(qk, v, kw, np.float32, CUDA)
