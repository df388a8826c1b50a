"""LSH hashing (lsh_buckets, lsh_rotations) and the sort plan (lsh_sort)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array

from npsparseattn.lsh import lsh_buckets, lsh_rotations, lsh_sort


def formula_buckets(x, rotations, n_buckets):
    """``argmax(concat[xR, -xR])`` per factor, evaluated directly in float64: (*lead, n_hashes, L)."""
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    rotated = np.einsum("...ld,dhc->...hlc", x.astype(np.float64), rotations.astype(np.float64))
    buckets = np.zeros(rotated.shape[:-1], dtype=np.int64)
    start, product = 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        buckets += product * np.argmax(np.concatenate([part, -part], axis=-1), axis=-1)
        start += f // 2
        product *= f
    return buckets


SHAPES = [
    pytest.param((37, 16), id="2d"),
    pytest.param((3, 50, 8), id="3d"),
    pytest.param((2, 3, 41, 5), id="4d"),
    pytest.param((2, 1, 2, 300, 64), id="5d-long"),
]

BUCKETS = [
    pytest.param(2, id="2"),
    pytest.param(16, id="16"),
    pytest.param(64, id="64"),
    pytest.param((4, 6), id="4x6"),
    pytest.param((2, 8, 4), id="2x8x4"),
    pytest.param((16,), id="(16,)"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_buckets", BUCKETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_formula_with_given_rotations(rng, shape, n_buckets, dtype):
    x = random_array(rng, shape, dtype)
    n_hashes = 3
    columns = sum(n_buckets) // 2 if isinstance(n_buckets, tuple) else n_buckets // 2
    rotations = random_array(rng, (shape[-1], n_hashes, columns))
    buckets = lsh_buckets(x, n_buckets, n_hashes=n_hashes, rotations=rotations)
    assert buckets.dtype == np.int32
    assert buckets.shape == shape[:-2] + (n_hashes, shape[-2])
    np.testing.assert_array_equal(buckets, formula_buckets(x, rotations, n_buckets))


@pytest.mark.parametrize("n_buckets", [8, (4, 8)])
def test_every_bucket_in_range_and_used(rng, n_buckets):
    x = random_array(rng, (4, 2000, 32)) * rng.standard_exponential((4, 2000, 1))
    buckets = lsh_buckets(x, n_buckets, n_hashes=2, seed=5)
    total = int(np.prod(n_buckets))
    assert buckets.min() >= 0 and buckets.max() < total
    assert len(np.unique(buckets)) == total  # 8000 random rows reach every bucket


def test_seed_is_reproducible_and_documented(rng):
    x = random_array(rng, (2, 100, 12))
    first = lsh_buckets(x, (4, 8), n_hashes=2, seed=42)
    np.testing.assert_array_equal(first, lsh_buckets(x, (4, 8), n_hashes=2, seed=42))
    drawn = np.random.default_rng(42).standard_normal((12, 2, 6))
    np.testing.assert_array_equal(lsh_rotations(12, (4, 8), n_hashes=2, seed=42), drawn)
    np.testing.assert_array_equal(first, lsh_buckets(x, (4, 8), n_hashes=2, rotations=drawn))
    assert not np.array_equal(first, lsh_buckets(x, (4, 8), n_hashes=2, seed=43))


def test_no_seed_draws_fresh_rotations(rng):
    x = random_array(rng, (200, 16))
    assert not np.array_equal(lsh_buckets(x, 16), lsh_buckets(x, 16))


def test_rounds_use_their_own_rotation(rng):
    x = random_array(rng, (120, 8))
    rotations = random_array(rng, (8, 3, 4))
    together = lsh_buckets(x, 8, n_hashes=3, rotations=rotations)
    for r in range(3):
        alone = lsh_buckets(x, 8, rotations=rotations[:, r : r + 1])
        np.testing.assert_array_equal(together[r], alone[0])


def test_float32_and_float64_copies_hash_alike(rng):
    x = random_array(rng, (3, 500, 32), np.float32)
    a = lsh_buckets(x, (8, 8), n_hashes=2, seed=0)
    np.testing.assert_array_equal(a, lsh_buckets(x.astype(np.float64), (8, 8), n_hashes=2, seed=0))


def test_float32_near_ties_are_decided_in_float64(rng):
    """Columns 0 and 1 of each round differ by 1e-9 relative: float32 rounding cannot order them, the float64
    product can; float32 rows must still get the float64 buckets (the kernel recomputes such rows)."""
    x = random_array(rng, (400, 16), np.float32)
    rotations = random_array(rng, (16, 2, 4))
    rotations[:, :, 1] = rotations[:, :, 0] * (1 + 1e-9 * rng.choice([-1.0, 1.0], size=(1, 2)))
    expected = formula_buckets(x, rotations, 8)
    assert {0, 1} <= set(np.unique(expected % 4))  # both near-tied columns win somewhere
    np.testing.assert_array_equal(lsh_buckets(x, 8, n_hashes=2, rotations=rotations), expected)
    np.testing.assert_array_equal(lsh_buckets(x.astype(np.float64), 8, n_hashes=2, rotations=rotations), expected)


def test_non_contiguous_and_float16_inputs(rng):
    base = random_array(rng, (60, 3, 16))
    x = base.transpose(1, 0, 2)[:, ::2]  # (3, 30, 16), strided rows
    rotations = random_array(rng, (16, 2, 5))
    np.testing.assert_array_equal(
        lsh_buckets(x, 10, n_hashes=2, rotations=rotations), formula_buckets(x, rotations, 10)
    )
    half = x.astype(np.float16)
    np.testing.assert_array_equal(
        lsh_buckets(half, 10, n_hashes=2, rotations=rotations), formula_buckets(half, rotations, 10)
    )


def test_ties_go_to_the_first_maximum():
    # x R = [1, -1]: concat = [1, -1, -1, 1]; argmax picks index 0, the first of the two maxima
    x = np.array([[1.0, 0.0]])
    rotations = np.array([[[1.0, -1.0]], [[0.0, 0.0]]])
    assert lsh_buckets(x, 4, rotations=rotations)[0, 0] == 0
    assert lsh_buckets(-x, 4, rotations=rotations)[0, 0] == 1  # [-1, 1, 1, -1]


def test_empty_inputs(rng):
    assert lsh_buckets(np.zeros((0, 5)), 4, n_hashes=2, seed=0).shape == (2, 0)
    assert lsh_buckets(np.zeros((3, 0, 7, 5)), 4, seed=0).shape == (3, 0, 1, 7)


# --- sort plan ----------------------------------------------------------------------------------


def stable_order(buckets):
    """Items ``r*L + p`` sorted by (round, bucket, position) with NumPy's stable argsort."""
    n_hashes = buckets.shape[-2]
    keys = buckets.astype(np.int64) + (np.arange(n_hashes) * (int(buckets.max(initial=0)) + 1))[:, None]
    return np.argsort(keys.reshape(buckets.shape[:-2] + (-1,)), axis=-1, kind="stable")


@pytest.mark.parametrize("shape", [(1, 50), (3, 64), (2, 3, 2, 33)])
@pytest.mark.parametrize("n_values", [2, 7, 1 << 20])
def test_sort_is_stable_by_round_bucket_position(rng, shape, n_values):
    buckets = rng.integers(0, n_values, shape)
    order, inverse = lsh_sort(buckets)
    n_items = shape[-2] * shape[-1]
    assert order.shape == inverse.shape == shape[:-2] + (n_items,)
    assert order.dtype == inverse.dtype == np.int32
    np.testing.assert_array_equal(order, stable_order(buckets))
    np.testing.assert_array_equal(
        np.take_along_axis(inverse, order, axis=-1), np.broadcast_to(np.arange(n_items), order.shape)
    )


def test_sort_of_hashed_buckets_groups_rounds_then_buckets(rng):
    x = random_array(rng, (2, 256, 16))
    buckets = lsh_buckets(x, 8, n_hashes=3, seed=1)
    order, _ = lsh_sort(buckets)
    length = 256
    rounds, positions = order // length, order % length
    np.testing.assert_array_equal(rounds, np.broadcast_to(np.repeat(np.arange(3), length), rounds.shape))
    sorted_buckets = np.take_along_axis(buckets.reshape(2, -1), order, axis=-1)
    offset = sorted_buckets + 8 * rounds
    assert np.all(np.diff(offset, axis=-1) >= 0)
    same = np.diff(offset, axis=-1) == 0
    assert np.all(np.diff(positions, axis=-1)[same] > 0)
    # bucket occupancy of a chunk, as the docstring shows
    chunk = sorted_buckets[:, 64:128]
    assert chunk.shape == (2, 64) and chunk.min() >= 0


def test_sort_docstring_example():
    order, inverse = lsh_sort(np.array([[1, 0, 1, 0]]))
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    np.testing.assert_array_equal(inverse, [2, 0, 3, 1])


def test_sort_empty():
    order, inverse = lsh_sort(np.zeros((2, 0), np.int32))
    assert order.shape == inverse.shape == (0,)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_buckets", "error", "message"),
    [
        (7, ValueError, "n_buckets must be even (argmax over [xR, -xR] gives an even count), got 7"),
        ((4, 3), ValueError, "every factor of n_buckets must be even"),
        ((), ValueError, "non-empty tuple of even ints, got ()"),
        (0, ValueError, "n_buckets must be >= 2, got 0"),
        (8.0, TypeError, "n_buckets must be an int, got 8.0"),
        (True, TypeError, "n_buckets must be an int, got True"),
        ((4, "8"), TypeError, "every factor of n_buckets must be an int, got '8'"),
    ],
)
def test_bad_n_buckets(rng, n_buckets, error, message):
    with pytest.raises(error) as info:
        lsh_buckets(random_array(rng, (10, 4)), n_buckets, seed=0)
    assert message in str(info.value)


def test_rotations_of_the_wrong_shape(rng):
    x = random_array(rng, (10, 16))
    with pytest.raises(ValueError) as info:
        lsh_buckets(x, 8, n_hashes=2, rotations=random_array(rng, (16, 2, 8)))
    assert "rotations must have shape (D, n_hashes, n_buckets//2) = (16, 2, 4) for D=16, n_hashes=2" in str(info.value)
    assert "got (16, 2, 8)" in str(info.value)
    with pytest.raises(ValueError, match=r"sum\(n_buckets factors\)//2\) = \(16, 1, 6\)"):
        lsh_buckets(x, (4, 8), rotations=random_array(rng, (16, 1, 4)))


@pytest.mark.parametrize(
    ("rotations", "seed", "error", "message"),
    [
        ("array", 1, ValueError, "pass either rotations or seed, not both"),
        ([[[1.0]]], None, TypeError, "rotations must be a NumPy array of shape (1, 1, 1), got builtins.list"),
        ("int", None, TypeError, "rotations has dtype int64; expected a real floating dtype"),
        (None, -1, ValueError, "seed must be a non-negative int or None, got -1"),
        (None, "1", TypeError, "seed must be a non-negative int or None, got '1'"),
        (None, 1.5, TypeError, "seed must be a non-negative int or None, got 1.5"),
    ],
)
def test_bad_rotations_or_seed(rotations, seed, error, message):
    if isinstance(rotations, str):
        rotations = np.ones((1, 1, 1), np.float64 if rotations == "array" else np.int64)
    with pytest.raises(error) as info:
        lsh_buckets(np.ones((3, 1)), 2, rotations=rotations, seed=seed)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "message"),
    [
        (np.ones(5), {}, ValueError, "x must have at least 2 axes (L, D), got shape (5,)"),
        (np.ones((5, 2), np.int64), {}, TypeError, "x has dtype int64; expected one of"),
        (np.ones((5, 0)), {}, ValueError, "x must have a last axis D >= 1, got shape (5, 0)"),
        ([[1.0, 2.0]], {}, TypeError, "x must be a NumPy or CuPy array, got builtins.list"),
        (np.ones((5, 2)), {"n_hashes": 0}, ValueError, "n_hashes must be >= 1, got 0"),
    ],
)
def test_bad_x_or_n_hashes(x, kwargs, error, message):
    with pytest.raises(error) as info:
        lsh_buckets(x, 4, seed=0, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("buckets", "error", "message"),
    [
        (np.ones(4, np.int32), ValueError, "buckets must have at least 2 axes (n_hashes, L), got shape (4,)"),
        (np.ones((1, 4)), TypeError, "buckets has dtype float64; expected an integer dtype"),
        (np.array([[0, -1]]), ValueError, "buckets must be >= 0, got -1"),
        (np.array([[0, 2**40]]), ValueError, "buckets must be < 2**31, got 1099511627776"),
    ],
)
def test_bad_buckets_for_sort(buckets, error, message):
    with pytest.raises(error) as info:
        lsh_sort(buckets)
    assert message in str(info.value)
