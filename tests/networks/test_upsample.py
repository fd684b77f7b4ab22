"""``networks.mobilevim.upsample.linear_resize`` is ``F.interpolate(..., mode="(bi/tri)linear",
align_corners=False)``: values and gradients against PyTorch's own on the CPU (float64: to float64
rounding; float32: to a few float32 ulps), for upsampling by integer and non-integer factors,
downsampling and axes left as they are, in 1D, 2D and 3D; and it hands the call to ``F.interpolate``
where its matrix products could not reproduce it. The CUDA side (autocast, determinism):
tests/networks/test_gpu_upsample.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_mobilevim.networks.mobilevim.upsample import LINEAR_MODE, interpolation_matrix, linear_resize

CASES = [((2, 5, 12, 12, 12), (24, 24, 24)),     # the decoder's 2x
         ((2, 5, 6, 6, 6), (48, 48, 48)),        # 8x, many outputs per source
         ((1, 3, 5, 7, 9), (13, 8, 20)),         # non-integer factors, one of them barely above 1
         ((1, 2, 9, 10, 11), (4, 5, 6)),         # downsampling
         ((2, 3, 6, 8, 8), (6, 16, 16)),         # an anisotropic plan: the first axis kept
         ((2, 4, 8, 8), (16, 24)),               # 2D
         ((3, 2, 7), (15,))]                      # 1D
# float64: the same arithmetic in another order; float32: a few ulps of values of order 1
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6}
GRAD_RTOL = {torch.float64: 1e-13, torch.float32: 1e-5}


def _reference(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=LINEAR_MODE[x.dim() - 2], align_corners=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape,size", CASES, ids=[f"{len(s) - 2}d-{'x'.join(map(str, z))}" for s, z in CASES])
def test_values_and_gradients_are_pytorchs(shape, size, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_()
    expected, got = _reference(x, size), linear_resize(x, size)
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL[dtype])
    grad_out = torch.randn(expected.shape, dtype=dtype, generator=generator)
    (grad_expected,) = torch.autograd.grad(expected, x, grad_out)
    (grad_got,) = torch.autograd.grad(got, x, grad_out)
    # a source voxel's gradient is a sum of up to (2 x factor)^dims weighted output gradients, added in
    # another order: the bound is relative to the sum of the terms' magnitudes
    (magnitude,) = torch.autograd.grad(_reference(x, size), x, grad_out.abs())
    assert ((grad_got - grad_expected).abs() <= GRAD_RTOL[dtype] * magnitude + ATOL[dtype]).all()


def test_matrix_rows_are_pytorchs_weights():
    """2x: outputs 2i and 2i+1 mix inputs i-1, i and i, i+1 by 1/4 and 3/4, the borders clamped; each row
    sums to one."""
    m = interpolation_matrix(4, 8, torch.device("cpu"), torch.float64)
    expected = torch.tensor([[1, 0, 0, 0], [.75, .25, 0, 0], [.25, .75, 0, 0], [0, .75, .25, 0],
                             [0, .25, .75, 0], [0, 0, .75, .25], [0, 0, .25, .75], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.equal(m, expected)
    assert torch.allclose(interpolation_matrix(7, 13, torch.device("cpu"), torch.float64).sum(1),
                          torch.ones(13, dtype=torch.float64))


def test_channels_last_input_and_an_unchanged_size_give_new_contiguous_tensors():
    x = torch.randn(1, 2, 4, 6, 6).to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(linear_resize(x, (8, 12, 12)), _reference(x, (8, 12, 12)), rtol=0, atol=2e-6)
    same = linear_resize(x, (4, 6, 6))
    assert same is not x and same.is_contiguous() and torch.equal(same, x)


def test_a_resize_first_run_under_inference_mode_leaves_training_working():
    """The matrices are cached: one first made in prediction (``torch.inference_mode``) is later used by
    training in the same process (the family benchmark, a script that predicts then trains), where an
    inference tensor cannot be saved for backward. Sizes no other test uses, so the cache is cold."""
    x = torch.randn(1, 1, 3, 5, 7)
    with torch.inference_mode():
        linear_resize(x, (13, 11, 9))
    assert not interpolation_matrix(3, 13, x.device, x.dtype).is_inference()
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(linear_resize(leaf, (13, 11, 9)).sum(), leaf)
    (expected,) = torch.autograd.grad(_reference(leaf, (13, 11, 9)).sum(), leaf)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5)


def test_torch_compile_leaves_the_resize_to_eager_pytorch():
    """Traced by torch.compile, the cached matrices would be rebuilt inside every call's compiled graph
    (arange, zeros, index_put_, a host-to-device copy that a CUDA graph cannot capture: the training step
    with ``nnUNet_compile`` failed so on the H200). MobileViM's compiled graphs hold none of that, nor the
    resize's matrix products: the resize runs eagerly, from the cache, between them."""
    from nnunetv2_mobilevim.networks.mobilevim import MobileViM

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).train()
    x = torch.randn(1, 1, 32, 32, 32)
    expected = net(x)
    got = torch.compile(net, backend=record)(x)
    torch._dynamo.reset()
    assert graphs
    ops = {getattr(n.target, "__name__", str(n.target)) for g in graphs for n in g.graph.nodes
           if n.op in ("call_function", "call_method")}
    assert "conv3d" in ops  # the network's convolutions are compiled
    assert not ops & {"arange", "zeros", "tensor", "index_put_", "matmul", "to"}, ops
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_falls_back_to_pytorch_where_matrix_products_would_round_differently():
    """bfloat16 (no autocast) and float32 with TF32/bfloat16 matrix products allowed: F.interpolate
    itself, bit for bit (the matrix path differs from it in the last bits, so equality shows the route)."""
    x = torch.randn(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    size = (10, 12, 14)
    assert not torch.equal(linear_resize(x, size), _reference(x, size))  # the matrix path ran
    half = x.bfloat16()
    out = linear_resize(half, size)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _reference(half, size))
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert torch.equal(linear_resize(x, size), _reference(x, size))
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("dim", [3, 2])
def test_mobilevim_fusion_and_output_follow_their_definitions(dim):
    """MobileViM_xs with its resizing: the decoder's fusion equals its definition, the classifier on
    concat(d_0, up(d_1), up(d_2), up(d_3)) with ``F.interpolate`` on the features; the network's output
    equals the fused logits resized by ``F.interpolate`` to the padded input and cropped (a patch that
    needs padding). float32 (the network keeps its Mamba projections in float32)."""
    from nnunetv2_mobilevim import MobileViM
    from nnunetv2_mobilevim.networks.mobilevim.conv_blocks import pad_to_multiple

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True, dim=dim).eval()
    x = torch.randn(1, 1, *([20, 36, 28][-dim:]))
    with torch.no_grad():
        xp = pad_to_multiple(x, net.total_stride)
        features = net.encoder(xp)
        decoded = [torch.randn_like(b(f)) for b, f in zip(net.decoder.bottlenecks, features)]  # d_0..d_3
        size = decoded[0].shape[2:]
        stacked = torch.cat([decoded[0]] + [_reference(t, size) for t in decoded[1:]], dim=1)
        torch.testing.assert_close(net.decoder.fuse_scales(decoded), net.decoder.classifier(stacked),
                                   rtol=0, atol=1e-5)
        logits = net.decoder(features)[0]
        expected = _reference(logits, xp.shape[2:])[(..., *[slice(0, n) for n in x.shape[2:]])]
        torch.testing.assert_close(net(x)[0], expected, rtol=0, atol=1e-5)
