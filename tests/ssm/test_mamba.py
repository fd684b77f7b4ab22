"""The Mamba-1 block: mamba_ssm.Mamba's parameters, the recurrence of mamba-ssm's reference scan
(``selective_scan_ref``: discretise with exp(Delta A), update, read out with C, skip D, gate SiLU(z))
checked against a step-by-step loop written here, groups of blocks in one call, recomputation, the
float32 guard, and the scan orders."""

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_mobilevim.ssm.mamba import Mamba, MambaGroup, flatten_tokens, unflatten_tokens


def naive_mamba(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """mamba_ssm.Mamba's forward one token at a time: h (B, L, d_model) -> (B, L, d_model)."""
    batch, length, _ = h.shape
    inner, n, r, k = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    xz = h @ m.in_proj.weight.T
    x, z = xz[..., :inner], xz[..., inner:]
    w = m.conv1d.weight[:, 0, :]  # (E, k): the last tap multiplies the current token
    conv = torch.zeros_like(x)
    for t in range(length):
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                conv[:, t] = conv[:, t] + w[:, j] * x[:, s]
    x = F.silu(conv + m.conv1d.bias)
    dbc = x @ m.x_proj.weight.T
    dt, B, C = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)  # (B, L, E)
    A = -torch.exp(m.A_log)  # (E, N)
    state = torch.zeros(batch, inner, n, dtype=h.dtype)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, t, :, None] * A) * state + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((state * C[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ m.out_proj.weight.T


def test_parameters_are_mamba_ssms():
    """Names and shapes of mamba_ssm.Mamba(d_model=24) (mamba_simple.py), so its checkpoints load."""
    m = Mamba(24)
    expected = {"A_log": (48, 16), "D": (48,), "in_proj.weight": (96, 24), "conv1d.weight": (48, 1, 4),
                "conv1d.bias": (48,), "x_proj.weight": (2 + 32, 48), "dt_proj.weight": (48, 2),
                "dt_proj.bias": (48,), "out_proj.weight": (24, 48)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert torch.equal(m.A_log[5], torch.log(torch.arange(1.0, 17.0)))  # S4D-real: A = -(1..N)
    lo, hi = F.softplus(m.dt_proj.bias).min(), F.softplus(m.dt_proj.bias).max()
    assert 1e-3 - 1e-7 <= lo and hi <= 1e-1 + 1e-7


@pytest.mark.parametrize("length", [1, 7, 40])
def test_block_equals_the_step_by_step_recurrence(length):
    torch.manual_seed(0)
    m = Mamba(12, d_state=6, expand=2, float32=False).double()
    for p in m.parameters():  # away from the initialisation's symmetries
        p.data.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, length, 12, dtype=torch.float64, requires_grad=True)
    y = m(h)
    ref = naive_mamba(m, h)
    assert (y - ref).abs().max() < 1e-10
    grads = torch.autograd.grad(y.square().sum(), [h, *m.parameters()])
    refs = torch.autograd.grad(ref.square().sum(), [h, *m.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(grads, refs)) < 1e-9


def test_group_runs_independent_blocks_in_one_call():
    torch.manual_seed(0)
    blocks = [Mamba(8, d_state=4, float32=False).double() for _ in range(3)]
    for b in blocks:
        for p in b.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    group = MambaGroup(blocks)
    xs = torch.randn(2, 3, 11, 8, dtype=torch.float64, requires_grad=True)
    y = group(xs)
    ref = torch.stack([naive_mamba(b, xs[:, i]) for i, b in enumerate(blocks)], 1)
    assert (y - ref).abs().max() < 1e-10
    g1 = torch.autograd.grad(y.sum(), [xs, *group.parameters()])
    g2 = torch.autograd.grad(ref.sum(), [xs, *group.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < 1e-9
    assert "blocks.2.dt_proj.bias" in group.state_dict()
    with pytest.raises(ValueError, match="same widths"):
        MambaGroup([Mamba(8), Mamba(16)])


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_recompute_gives_the_same_gradients_and_stores_less():
    torch.manual_seed(0)
    m = Mamba(16, float32=False)
    h = torch.randn(1, 512, 16, requires_grad=True)
    grads = {}
    for mode in (False, True):
        m.recompute = mode
        y = m(h)
        grads[mode] = torch.autograd.grad(y.square().sum(), [h, *m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    m.recompute = False
    stored = _saved_bytes(lambda: m(h))
    m.recompute = True
    recomputed = _saved_bytes(lambda: m(h))
    assert recomputed < 0.3 * stored, (recomputed, stored)


def test_float32_inside_under_half_precision_autocast():
    """Under bfloat16 autocast the guarded block computes exactly what it computes in float32."""
    torch.manual_seed(0)
    m = Mamba(16)
    h = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(h)
    assert y.dtype == torch.float32 and torch.equal(y, m(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = m(h.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_scan_orders_visit_the_tokens_in_the_order_they_claim():
    d, h, w = 2, 3, 4
    x = torch.arange(d * h * w, dtype=torch.float32).reshape(1, 1, d, h, w)  # value = raster index
    raster = [float(i * h * w + j * w + k) for i in range(d) for j in range(h) for k in range(w)]
    h_fastest = [float(i * h * w + j * w + k) for i in range(d) for k in range(w) for j in range(h)]
    depth_fastest = [float(i * h * w + j * w + k) for j in range(h) for k in range(w) for i in range(d)]
    assert flatten_tokens(x, ((0, 1, 2), False))[0, :, 0].tolist() == raster
    assert flatten_tokens(x, ((0, 1, 2), True))[0, :, 0].tolist() == raster[::-1]
    assert flatten_tokens(x, ((0, 2, 1), False))[0, :, 0].tolist() == h_fastest
    assert flatten_tokens(x, ((1, 2, 0), False))[0, :, 0].tolist() == depth_fastest
    y = torch.randn(2, 5, d, h, w)
    for order in [((0, 1, 2), False), ((2, 0, 1), True), ((1, 0, 2), False)]:
        assert torch.equal(unflatten_tokens(flatten_tokens(y, order), order, (d, h, w)), y)
    img = torch.randn(1, 3, 4, 5)
    assert torch.equal(unflatten_tokens(flatten_tokens(img, ((1, 0), True)), ((1, 0), True), (4, 5)), img)
    with pytest.raises(ValueError):
        flatten_tokens(y, ((0, 1), False))


def test_a_token_only_affects_the_tokens_after_it_in_the_scan_order():
    torch.manual_seed(0)
    m = Mamba(4, d_state=4, float32=False).double()
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    order = ((2, 0, 1), True)
    base = unflatten_tokens(m(flatten_tokens(x, order)), order, (3, 3, 3))
    x2 = x.clone()
    x2[0, :, 1, 2, 0] += 1.0
    changed = (unflatten_tokens(m(flatten_tokens(x2, order)), order, (3, 3, 3)) - base).abs().sum(1)[0] > 0
    position = flatten_tokens(torch.arange(27.0).reshape(1, 1, 3, 3, 3), order)[0, :, 0].tolist()
    index = {int(v): i for i, v in enumerate(position)}  # raster index -> place in the order
    p = index[1 * 9 + 2 * 3 + 0]
    for raster in range(27):
        i, j, k = raster // 9, raster // 3 % 3, raster % 3
        assert bool(changed[i, j, k]) == (index[raster] >= p), (raster, index[raster], p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_equal_the_pytorch_path():
    torch.manual_seed(0)
    group = MambaGroup([Mamba(32), Mamba(32)]).cuda()
    x = torch.randn(2, 2, 300, 32, device="cuda", requires_grad=True)
    single = group.blocks[0]  # one block: its own path (B and C without a group axis)
    y = {b: single.__setattr__("scan_backend", b) or single(x[:, 0].detach()) for b in ("torch", "mamba_ssm")}
    assert (y["torch"] - y["mamba_ssm"]).abs().max() < 1e-4 * y["torch"].abs().max()
    outs, grads = [], []
    for backend in ("torch", "mamba_ssm"):
        for b in group.blocks:
            b.scan_backend = backend
        y = group(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *group.parameters()]))
    assert (outs[0] - outs[1]).abs().max() < 1e-4 * outs[0].abs().max()
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max() + 1e-6
