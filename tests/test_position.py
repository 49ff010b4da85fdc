"""Fourier position features against hand-computed values and transformers' implementation."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.modalities.position import fourier_channels, fourier_features, grid_fourier_features, linear_positions


def s(a: float) -> float:
    return math.sin(math.pi * a)


def c(a: float) -> float:
    return math.cos(math.pi * a)


def assert_values(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=0)


def test_linear_positions_2d():
    assert_values(
        linear_positions([2, 3]),
        [[[-1.0, -1.0], [-1.0, 0.0], [-1.0, 1.0]], [[1.0, -1.0], [1.0, 0.0], [1.0, 1.0]]],
    )


def test_grid_1d_three_points_two_bands():
    # max_resolution 3 -> frequencies linspace(1, 1.5, 2) = [1, 1.5]
    expected = [
        [-1.0, s(-1), s(-1.5), c(-1), c(-1.5)],
        [0.0, 0.0, 0.0, 1.0, 1.0],
        [1.0, s(1), s(1.5), c(1), c(1.5)],
    ]
    assert_values(grid_fourier_features([3], 2), expected)
    assert_values(fourier_features(linear_positions([3]), 2, [3]), expected)


def test_grid_2d_two_by_three():
    # dim 0 (res 2): frequencies [1, 1]; dim 1 (res 3): [1, 1.5]. Order: y, x, sines (y bands, x bands), cosines.
    expected = [
        [y, x, s(y), s(y), s(x), s(1.5 * x), c(y), c(y), c(x), c(1.5 * x)]
        for y, x in ((-1, -1), (-1, 0), (-1, 1), (1, -1), (1, 0), (1, 1))
    ]
    assert expected[4] == [1, 0, s(1), s(1), 0.0, 0.0, c(1), c(1), 1.0, 1.0]
    assert_values(grid_fourier_features([2, 3], 2), expected)


# pos (0.25, -0.5); resolution (4, 6), 3 bands -> frequencies [1, 1.5, 2] and [1, 2, 3].
POS = [0.25, -0.5]
SINES = [s(0.25), s(0.375), s(0.5), s(-0.5), s(-1.0), s(-1.5)]
COSINES = [c(0.25), c(0.375), c(0.5), c(-0.5), c(-1.0), c(-1.5)]


@pytest.mark.parametrize(
    "concat_pos,sine_only,expected",
    [
        (True, False, POS + SINES + COSINES),
        (False, False, SINES + COSINES),
        (True, True, POS + SINES),
        (False, True, SINES),
    ],
)
def test_fourier_features_variants(concat_pos, sine_only, expected):
    out = fourier_features(torch.tensor([POS]), 3, [4, 6], concat_pos=concat_pos, sine_only=sine_only)
    assert_values(out, [expected])
    assert out.shape[-1] == fourier_channels(2, 3, concat_pos, sine_only)


def test_fourier_features_keeps_leading_dims():
    pos = torch.tensor(POS).expand(2, 3, 2)
    out = fourier_features(pos, 3, [4, 6])
    assert out.shape == (2, 3, 14)
    assert_values(out[1, 2], POS + SINES + COSINES)


def test_grid_3d():
    assert grid_fourier_features([2, 2, 2], 2).shape == (8, 15)
    # 2x2x4: point 6 is index (0, 1, 2) -> (-1, 1, 1/3); dim 2 (res 4) has frequencies [1, 2].
    out = grid_fourier_features([2, 2, 4], 2)
    assert out.shape == (16, 15)
    third = 1.0 / 3.0
    assert_values(out[6, :3], [-1.0, 1.0, third])
    assert_values(out[6, [7, 8, 13, 14]], [s(third), s(2 * third), c(third), c(2 * third)])
    assert_values(out[15, :3], [1.0, 1.0, 1.0])
    assert_values(out[0, 9:], [c(-1)] * 4 + [c(-1), c(-2)])


@pytest.mark.parametrize(
    "args,channels",
    [((1, 2), 5), ((2, 2), 10), ((3, 2), 15), ((2, 3, False), 12), ((2, 3, True, True), 8), ((2, 3, False, True), 6)],
)
def test_fourier_channels(args, channels):
    assert fourier_channels(*args) == channels


def test_mismatched_resolution_raises():
    with pytest.raises(ValueError, match="max_resolution"):
        fourier_features(torch.zeros(4, 2), 3, [4, 6, 8])


@pytest.mark.parametrize("concat_pos,sine_only", [(True, False), (False, False), (True, True)])
def test_matches_transformers(concat_pos, sine_only):
    from transformers.models.perceiver.modeling_perceiver import build_linear_positions, generate_fourier_features

    dims = (5, 7)
    hf_pos = build_linear_positions(dims)
    torch.testing.assert_close(linear_positions(dims), hf_pos, atol=1e-6, rtol=0)
    hf = generate_fourier_features(hf_pos.reshape(1, -1, 2), 4, max_resolution=dims, concat_pos=concat_pos,
                                   sine_only=sine_only)
    hf = hf.reshape(35, -1)  # transformers drops the batch dim when concat_pos=False
    ours = fourier_features(linear_positions(dims).reshape(-1, 2), 4, dims, concat_pos=concat_pos, sine_only=sine_only)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=0)
    if concat_pos and not sine_only:
        torch.testing.assert_close(grid_fourier_features(dims, 4), hf, atol=1e-6, rtol=0)
