"""Wan 3D RoPE: the complex-number formula and temporal re-rotation, per backend;
torch.compile, empty inputs and bad head dims."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import apply_wan_rope, rotate_temporal, wan_rope_axis_pairs

from conftest import op_backends

BACKENDS = op_backends("apply_wan_rope")
TEMPORAL_BACKENDS = op_backends("rotate_temporal")


def complex_formula(x, grid, offset, theta=10000.0):
    """x * exp(i * angle) with angles built axis by axis, as Wan's rope_params does."""
    B, S, H, D = x.shape
    f, h, w = grid
    c = D // 6
    dims = [D - 4 * c, 2 * c, 2 * c]

    def table(n_pos, d, start):
        pos = torch.arange(start, start + n_pos, dtype=torch.float64)
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        return torch.polar(torch.ones(n_pos, d // 2, dtype=torch.float64), torch.outer(pos, inv))

    ft, fh, fw = (table(n, d, o) for n, d, o in zip((f, h, w), dims, offset))
    freqs = torch.cat(
        [
            ft[:, None, None].expand(f, h, w, -1),
            fh[None, :, None].expand(f, h, w, -1),
            fw[None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(S, 1, D // 2)
    xc = torch.view_as_complex(x.double().reshape(B, S, H, D // 2, 2))
    return torch.view_as_real(xc * freqs).reshape(B, S, H, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [128, 64, 16, 12])
@pytest.mark.parametrize("offset", [(0, 0, 0), (27, 2, 5), (3000, 0, 0)])
def test_matches_complex_formula(D, offset, backend):
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 3, D)
    got = apply_wan_rope(x, grid, offset, backend=backend)
    want = complex_formula(x, grid, offset)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_axis_split_for_wan():
    assert wan_rope_axis_pairs(128) == (22, 21, 21)  # pairs 0-21, 22-42, 43-63


@pytest.mark.parametrize("backend", TEMPORAL_BACKENDS)
@pytest.mark.parametrize("p,d", [(0, 5), (12, -9), (300, 1234)])
def test_rotate_temporal_composition(p, d, backend):
    grid = (3, 2, 2)
    x = torch.randn(1, 12, 2, 64)
    a = rotate_temporal(apply_wan_rope(x, grid, (p, 1, 0)), d, backend=backend)
    b = apply_wan_rope(x, grid, (p + d, 1, 0))
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


def test_rotate_temporal_tensor_delta_and_only_temporal_pairs():
    x = torch.randn(2, 5, 3, 32)
    delta = torch.tensor([[4.0], [-7.0]])  # per sample
    y = rotate_temporal(x, delta)
    n_t = wan_rope_axis_pairs(32)[0]
    torch.testing.assert_close(y[..., 2 * n_t :], x[..., 2 * n_t :], atol=1e-6, rtol=0)
    torch.testing.assert_close(y[0:1], rotate_temporal(x[0:1], 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1:2], rotate_temporal(x[1:2], -7), atol=1e-6, rtol=0)
    # a rotation keeps norms
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_dtype_preserved():
    x = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    assert apply_wan_rope(x, (2, 2, 2)).dtype == torch.bfloat16
    assert rotate_temporal(x, 3).dtype == torch.bfloat16


def test_compile_fullgraph():
    x = torch.randn(1, 12, 2, 32)
    delta = torch.tensor([[3.0]])

    def call(x, delta):
        return rotate_temporal(apply_wan_rope(x, (3, 2, 2), (5, 0, 1)), delta)

    torch.testing.assert_close(torch.compile(call, fullgraph=True)(x, delta), call(x, delta))


def test_empty_input_gives_empty_output():
    x = torch.randn(0, 8, 2, 16)
    assert apply_wan_rope(x, (2, 2, 2)).shape == x.shape
    assert rotate_temporal(torch.randn(2, 0, 2, 16), 3).shape == (2, 0, 2, 16)
    assert apply_wan_rope(torch.randn(1, 0, 2, 16), (0, 2, 2)).shape == (1, 0, 2, 16)


@pytest.mark.parametrize("D", [0, 7])
def test_bad_head_dim_is_a_value_error(D):
    with pytest.raises(ValueError, match="head_dim"):
        apply_wan_rope(torch.randn(1, 8, 2, D), (2, 2, 2))
    with pytest.raises(ValueError, match="head_dim"):
        rotate_temporal(torch.randn(1, 8, 2, D), 1)
