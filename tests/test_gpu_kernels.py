"""The mamba-ssm kernel backend against the exact PyTorch path, on CUDA (skipped elsewhere).

Run on the GPU machine: pytest -m gpu tests/test_gpu_kernels.py -s  (prints the measured errors).
Tolerances: float32 1e-4 relative to the output scale; fp16 autocast 2e-2 (what the kernels' half
inputs allow; the state stays float32 in both backends).
"""

from __future__ import annotations

import copy

import pytest
import torch

from nnunetv2_mobilevim import DualDirectionMamba, MobileViM
from nnunetv2_mobilevim.scan import load_kernels, selective_scan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(load_kernels()[0] is None, reason="needs mamba-ssm kernels")]

FP32_TOL, FP16_TOL = 1e-4, 2e-2
# token dim E and tokens per profile of every DualDirectionMamba in MobileViM_s / _xs at a 128^3 patch
# (profiles of 64, 32, 16, 8 positions cut into tokens of 2); batch = 2 samples x 3 profiles
BLOCK_SHAPES = [(16, 32), (64, 16), (96, 8), (128, 4), (48, 16), (80, 4), (64, 57)]


@pytest.fixture
def no_tf32():
    """True float32: cuDNN's default TF32 convolutions would amplify the scan's 1e-7 differences to ~1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def report(name: str, value: float) -> None:
    print(f"\n[agreement] {name}: max relative difference {value:.2e}")


def test_raw_scan_matches_torch_fp32_and_grads():
    torch.manual_seed(0)
    b, d, n, length = 3, 64, 16, 37
    dev = "cuda"
    u = torch.randn(b, d, length, device=dev, requires_grad=True)
    delta = (0.5 * torch.randn(b, d, length, device=dev)).requires_grad_()
    A = (-torch.rand(d, n, device=dev) - 0.1).requires_grad_()
    B = torch.randn(b, 2, n, length, device=dev, requires_grad=True)
    C = torch.randn(b, 2, n, length, device=dev, requires_grad=True)
    D = torch.randn(d, device=dev, requires_grad=True)
    z = torch.randn(b, d, length, device=dev, requires_grad=True)
    bias = (0.1 * torch.randn(d, device=dev)).requires_grad_()
    inputs = [u, delta, A, B, C, D, z, bias]
    outs, grads = {}, {}
    g = torch.randn(b, d, length, device=dev)
    for backend in ("mamba_ssm", "torch"):
        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=backend)
        outs[backend] = y
        grads[backend] = torch.autograd.grad((y * g).sum(), inputs)
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report("selective_scan fp32 output", err)
    assert err < FP32_TOL
    for name, a, c in zip("u delta A B C D z bias".split(), grads["mamba_ssm"], grads["torch"]):
        e = rel_err(a, c)
        report(f"selective_scan fp32 grad {name}", e)
        assert e < 1e-3, name


@pytest.mark.parametrize("d_model,tokens", BLOCK_SHAPES)
@pytest.mark.parametrize("amp", [False, True])
def test_dual_direction_mamba_backends_agree(d_model, tokens, amp):
    torch.manual_seed(0)
    layer = DualDirectionMamba(d_model).cuda()
    layers = {"mamba_ssm": layer, "torch": copy.deepcopy(layer)}
    layers["mamba_ssm"].scan_backend, layers["torch"].scan_backend = "mamba_ssm", "torch"
    x = torch.randn(6, tokens, d_model, device="cuda")
    outs, grads = {}, {}
    for name, mod in layers.items():
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            y = mod(xi)
        y.float().square().mean().backward()
        outs[name] = y
        grads[name] = [xi.grad] + [p.grad for p in mod.parameters()]
    tol = FP16_TOL if amp else FP32_TOL
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report(f"DualDirectionMamba E={d_model} L={tokens} {'fp16' if amp else 'fp32'} output", err)
    assert err < tol
    worst = max(rel_err(a, b) for a, b in zip(grads["mamba_ssm"], grads["torch"]))
    report(f"DualDirectionMamba E={d_model} L={tokens} {'fp16' if amp else 'fp32'} grads (worst)", worst)
    assert worst < (5e-2 if amp else 1e-3)


@pytest.mark.parametrize("variant", ["s", "xs"])
def test_whole_network_backends_agree(variant, monkeypatch, no_tf32):
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=4, variant=variant).cuda().eval()
    x = torch.randn(2, 1, 128, 128, 128, device="cuda")
    outs = {}
    for backend in ("mamba_ssm", "torch"):
        monkeypatch.setenv("NNUNETV2_MOBILEVIM_SCAN", backend)
        with torch.no_grad():
            outs[backend] = net(x)
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report(f"MobileViM_{variant} 128^3 fp32 logits", err)
    assert err < FP32_TOL


def test_whole_network_training_step_under_amp_is_finite():
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=4, variant="s", deep_supervision=True).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    x = 5 * torch.randn(2, 1, 128, 128, 128, device="cuda")
    target = (x[:, 0] > 2).long()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.float16):
            outs = net(x)
            loss = torch.nn.functional.cross_entropy(outs[0].float(), target)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)


def test_cuda_graph_and_folded_batchnorm_keep_the_logits(no_tf32):
    from nnunetv2_mobilevim.fast_inference import CUDAGraphRunner, fold_batchnorm

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=4, variant="s").cuda().eval()
    x = torch.randn(1, 1, 128, 128, 128, device="cuda")
    runner = CUDAGraphRunner(fold_batchnorm(net))
    with torch.no_grad():
        ref = net(x)
    fast = runner(x)
    fast2 = runner(x + 1)  # replay with new data
    with torch.no_grad():
        ref2 = net(x + 1)
    for a, b in ((fast, ref), (fast2, ref2)):
        err = rel_err(a, b)
        report("CUDA graph + folded BN vs plain, fp32 logits", err)
        assert err < 1e-4


def test_fast_inference_follows_loaded_weights(no_tf32):
    """nnU-Net's predictor reloads the state dict for every case: the captured graph must use the new weights."""
    torch.manual_seed(0)
    a = MobileViM(input_channels=1, num_classes=3, variant="xs", fast_inference=True).cuda().eval()
    b = MobileViM(input_channels=1, num_classes=3, variant="xs").cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.inference_mode():
        first = a(x)
        a.load_state_dict(b.state_dict())
        second, expected = a(x), b(x)
    assert a._runtime.fast is not None  # the fast path ran
    assert rel_err(second, expected) < 1e-4
    assert rel_err(first, expected) > 1e-2


def test_fast_inference_under_autocast_follows_new_weights_across_autocast_regions():
    """As nnU-Net validates and predicts: every call in an fp16 autocast region of its own, the weights
    changed in between. The graph must cast the live weights each replay, not reuse autocast's cached
    half-precision copies from the region it was captured in (freed when that region ends)."""
    torch.manual_seed(0)
    a = MobileViM(input_channels=1, num_classes=3, variant="xs", fast_inference=True).cuda().eval()
    b = MobileViM(input_channels=1, num_classes=3, variant="xs").cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.float16):
            a(x)  # captures
        torch.full((64, 2 ** 20), 7.0, device="cuda")  # reuses freed memory, as a training step would
        a.load_state_dict(b.state_dict())
        with torch.autocast("cuda", dtype=torch.float16):
            second = a(x)
        with torch.autocast("cuda", dtype=torch.float16):
            expected = b(x)
    assert a._runtime.fast is not None and len(a._runtime.fast[1]._graphs) == 1
    report("fast inference after new weights, separate fp16 autocast regions", rel_err(second, expected))
    assert rel_err(second, expected) < FP16_TOL


@pytest.fixture
def cudnn_autotune():
    """cuDNN autotuning on, as nnUNetv2_train runs: the graphed network autotunes while it captures,
    and the eager copies then reuse the algorithms it found (cuDNN's benchmark cache is per process)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("amp", [False, True])
def test_graphed_training_matches_eager_over_optimizer_steps(no_tf32, cudnn_autotune, amp):
    """Forward + backward replayed from CUDA graphs give the eager network's deep-supervision outputs and
    gradients, step after step, with new data every step and weights the optimiser changed in place.

    All three copies are channels_last_3d, as nnUNetTrainerMobileViM trains. Two eager copies differ
    too (atomic adds in backward kernels), and training amplifies that from step to step; so after
    the first step the graphed copy must stay within 10x the eager-vs-eager difference. Replaying a
    stale input or stale weights would be off by orders of magnitude more."""
    torch.manual_seed(0)
    layout = torch.channels_last_3d
    eager = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).cuda().train()
    eager.to(memory_format=layout)
    nets = (copy.deepcopy(eager).enable_cuda_graph_training(), eager, copy.deepcopy(eager))  # graphed first
    optimizers = [torch.optim.SGD(n.parameters(), lr=1e-2, momentum=0.99, nesterov=True, fused=True) for n in nets]
    first_step_tol = FP16_TOL if amp else 1e-2
    for step in range(3):
        x = torch.randn(2, 1, 64, 64, 64, device="cuda")
        seen = []
        for net, opt in zip(nets, optimizers):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                outs = net(x)
                loss = sum(w * o.float().square().mean() for w, o in zip((1.0, 0.5, 0.25, 0.125), outs))
            loss.backward()
            seen.append(([o.detach().clone() for o in outs],
                         torch.cat([p.grad.flatten() for p in net.parameters()])))
            opt.step()
        (outs_g, grads_g), (outs_a, grads_a), (outs_b, grads_b) = seen
        errs = {}
        for label, (outs, grads) in (("twin", (outs_b, grads_b)), ("graphed", (outs_g, grads_g))):
            errs[label] = (max(rel_err(o, a) for o, a in zip(outs, outs_a)), rel_err(grads, grads_a))
            report(f"{label} vs eager training, {'fp16 autocast' if amp else 'fp32'}, step {step}: "
                   f"outputs / gradients", max(errs[label]))
        for i in range(2):
            tol = first_step_tol if step == 0 else max(first_step_tol, 10 * errs["twin"][i])
            assert errs["graphed"][i] < tol, (step, i, errs)
    assert len(nets[0]._runtime.training_graphs) == 1  # captured once, replayed after
    # BatchNorm running statistics: three updates each, none from the warm-up before capture
    stats = [torch.cat([b.float().flatten() for b in n.buffers()]) for n in nets]
    report("graphed vs eager BatchNorm running statistics after 3 steps", rel_err(stats[0], stats[1]))
    assert rel_err(stats[0], stats[1]) < max(first_step_tol, 10 * rel_err(stats[2], stats[1]))
    counts = [m.num_batches_tracked.item() for m in nets[0].modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert counts and set(counts) == {3}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_graphed_training_accumulates_gradients(no_tf32, set_to_none):
    """Two backward passes without zeroing in between sum their gradients, as in eager PyTorch, also
    when .grad still holds the graph's buffer from the step before."""
    torch.manual_seed(0)
    eager = MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True).cuda().train()
    graphed = copy.deepcopy(eager).enable_cuda_graph_training()
    eager.to(memory_format=torch.channels_last_3d)
    xs = [torch.randn(2, 1, 64, 64, 64, device="cuda") for _ in range(3)]  # 32^3 leaves BatchNorm 2 values

    def grads_after(net, batches):
        net.zero_grad(set_to_none=set_to_none)
        for x in batches:
            sum(o.float().square().mean() for o in net(x)).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    grads_after(graphed, xs[:1])  # captures, and leaves .grad pointing at the graph's buffers
    for batches in (xs[1:], xs[:1]):
        expected, got = grads_after(eager, batches), grads_after(graphed, batches)
        report(f"graphed vs eager accumulated gradients over {len(batches)} batch(es)", rel_err(got, expected))
        assert rel_err(got, expected) < 1e-3
        # each .grad in its parameter's layout (channels_last_3d weights), as fused optimisers require
        assert all(p.grad.stride() == p.stride() for p in graphed.parameters())


def test_our_kernel_wrapper_matches_mamba_ssms_own():
    """We call mamba-ssm's compiled kernel directly (import time); mamba-ssm's wrapper must agree exactly."""
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    b, d, n, length = 2, 32, 16, 29
    u = torch.randn(b, d, length, device="cuda", requires_grad=True)
    delta = (0.5 * torch.randn(b, d, length, device="cuda")).requires_grad_()
    A = (-torch.rand(d, n, device="cuda") - 0.1).requires_grad_()
    B = torch.randn(b, 2, n, length, device="cuda", requires_grad=True)
    C = torch.randn(b, 2, n, length, device="cuda", requires_grad=True)
    D = torch.randn(d, device="cuda", requires_grad=True)
    z = torch.randn(b, d, length, device="cuda", requires_grad=True)
    bias = (0.1 * torch.randn(d, device="cuda")).requires_grad_()
    inputs, g = [u, delta, A, B, C, D, z, bias], torch.randn(b, d, length, device="cuda")
    results = []
    for fn in (load_kernels()[0], interface.selective_scan_fn):
        for z_arg in (z, None):
            y = fn(u, delta, A, B, C, D=D, z=z_arg, delta_bias=bias, delta_softplus=True)
            used = [t for t in inputs if z_arg is not None or t is not z]
            results.append((y, torch.autograd.grad((y * g).sum(), used)))
    for ours, theirs in zip(results[:2], results[2:]):
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        for a, c in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # backward kernels add atomically


def test_fast_inference_with_deep_supervision_as_in_validation(no_tf32):
    """nnU-Net validates with deep supervision on and predicts with it off, on the same network object."""
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).cuda()
    net.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        net(torch.randn(2, 1, 64, 64, 64, device="cuda") * 3 + 1)
    net.eval()
    plain = copy.deepcopy(net)
    net.fast_inference = True
    x = torch.randn(2, 1, 64, 64, 64, device="cuda")
    for deep_supervision in (True, False, True):
        net.decoder.deep_supervision = plain.decoder.deep_supervision = deep_supervision
        with torch.no_grad():
            fast, ref = net(x), plain(x)
        fast, ref = (fast, ref) if deep_supervision else ([fast], [ref])
        assert len(fast) == len(ref) == (4 if deep_supervision else 1)
        err = max(rel_err(a, b) for a, b in zip(fast, ref))
        report(f"fast inference, deep supervision {deep_supervision}", err)
        assert err < 1e-4


def test_whole_step_graph_matches_nnunets_train_step(no_tf32, cudnn_autotune):
    """The trainer's step replayed from one CUDA graph updates the weights as nnU-Net's own (eager)
    ``nnUNetTrainer.train_step`` does: nnU-Net's DC+CE deep-supervision loss, fp16 autocast, GradScaler,
    clipping, fused AdamW; with a learning-rate change after capture (a scheduler's epoch step).

    Compared per step: the parameter update (after - before) of the graphed copy against the reference;
    a second eager copy gives the run-to-run difference (atomic adds in backward kernels). A stale input,
    stale weights or a stale learning rate (0.4x at step 4) would change it by about the update itself."""
    pytest.importorskip("nnunetv2")
    from types import SimpleNamespace

    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_mobilevim.graphed_training import GraphedTrainStep
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).cuda().train()
    net.to(memory_format=torch.channels_last_3d)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])  # nnU-Net's deep-supervision weights (last one 0), normalised

    def trainer_state(network):
        loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
        return SimpleNamespace(device=torch.device("cuda"), network=network, enable_deep_supervision=True,
                               optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=3e-2, fused=True),
                               grad_scaler=torch.amp.GradScaler("cuda"),
                               loss=DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist()))

    ref, twin, graphed = (trainer_state(n) for n in (net, copy.deepcopy(net), copy.deepcopy(net)))
    step = GraphedTrainStep(lambda *t: nnUNetTrainerMobileViM._train_step_on_gpu(graphed, *t), [graphed.optimizer])
    trained = False
    for i in range(6):  # 3 eager warm-up steps, capture + replay, replay (new lr), replay
        if i == 4:
            for s in (ref, twin, graphed):
                s.optimizer.param_groups[0]["lr"] = 4e-4
        labels = torch.randint(0, 3, (2, 1, 64, 64, 64)).float()
        batch = {"data": torch.randn(2, 1, 64, 64, 64).pin_memory(),
                 "target": [labels[..., ::f, ::f, ::f].contiguous().pin_memory() for f in (1, 2, 4, 8)]}
        before = [torch.cat([p.detach().flatten().clone() for p in s.network.parameters()]) for s in (ref, twin, graphed)]
        nnUNetTrainer.train_step(ref, batch)
        nnUNetTrainer.train_step(twin, batch)
        step(batch["data"], *batch["target"])
        after = [torch.cat([p.detach().flatten() for p in s.network.parameters()]) for s in (ref, twin, graphed)]
        updates = [a - b for a, b in zip(after, before)]
        # relative L2, not max: Adam moves a parameter whose gradient is ~0 by +-lr whatever its sign,
        # so single elements flip between any two runs
        err_twin, err_graphed = (float((u - updates[0]).norm() / updates[0].norm().clamp_min(1e-12))
                                 for u in updates[1:])
        print(f"\n[agreement] whole-step graph vs nnU-Net's train_step, step {i}: parameter update, relative L2 "
              f"difference {err_graphed:.2e} (second eager run: {err_twin:.2e})")
        trained = trained or bool(updates[0].abs().max() > 0)  # GradScaler may skip early steps (inf)
        assert err_graphed < max(FP16_TOL, 1.5 * err_twin), (i, err_graphed, err_twin)  # measured: 0.9-1.1x
    assert trained and len(step) == 1  # captured once, replayed after
    assert graphed.optimizer.param_groups[0]["lr"] == 4e-4 and isinstance(graphed.optimizer.param_groups[0]["lr"], float)
    assert graphed.grad_scaler.get_scale() == ref.grad_scaler.get_scale()
