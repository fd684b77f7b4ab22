"""CUDA-graph replay on the GPU: inference (BatchNorm-folded copy) and training (forward/backward
graphs; the whole training step). None of these needs the mamba-ssm kernels: the comparisons that must
be deterministic run every Mamba layer on the PyTorch scan.

Run on the GPU machine: pytest -m gpu tests/acceleration/test_gpu_graphs.py -s   (prints the measured differences).

Training comparisons run where eager PyTorch is deterministic: fixed data, TF32 off, deterministic
cuDNN algorithms chosen once per process, the PyTorch scan, and no atomic adds (MobileViM resizes with
matrix products, ``networks.mobilevim.upsample``, since f214471); SGD (its update is proportional to
the gradient) besides the default AdamW. The whole-step replay must then give the eager step's and
nnU-Net's updates bit for bit (measured on an H200: docs/benchmarks/h200_gpu_tests_linear_resize.txt);
the other tolerances are fixed numbers far below what a stale input, stale weights, a stale learning
rate, a missing unscale or missing clipping does (tests/planted/ shows each of them caught).
"""

from __future__ import annotations

import copy
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch
from gpu_helpers import rel_err, rel_l2, report, use_torch_scan
from torch import nn

from nnunetv2_mobilevim import MobileViM
from nnunetv2_mobilevim.acceleration.inference import CUDAGraphRunner, FastInference, FastPathWarning, fold_batchnorm
from nnunetv2_mobilevim.acceleration.training import GraphedTrainStep, TrainingGraphs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FP32_TOL, FP16_TOL = 1e-4, 2e-2
# relative L2 difference of one step's parameter update, replayed vs eager from the same state (fp16 autocast)
UPDATE_TOL = {"SGD": 1e-2}


# --- inference --------------------------------------------------------------------------------------

def test_cuda_graph_and_folded_batchnorm_keep_the_logits(no_tf32):
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
        report("CUDA graph + folded BN vs plain, fp32 logits, max relative", err)
        assert err < FP32_TOL


def test_fast_inference_follows_loaded_weights(no_tf32):
    """nnU-Net's predictor reloads the state dict for every case: the captured graph must use the new weights."""
    torch.manual_seed(0)
    a = FastInference(MobileViM(input_channels=1, num_classes=3, variant="xs")).cuda().eval()
    b = MobileViM(input_channels=1, num_classes=3, variant="xs").cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.inference_mode():
        first = a(x)
        a.load_state_dict(b.state_dict())
        second, expected = a(x), b(x)
    assert a._runtime.folded is not None  # the fast path ran
    assert rel_err(second, expected) < FP32_TOL
    assert rel_err(first, expected) > 1e-2


def test_fast_inference_under_autocast_follows_new_weights_across_autocast_regions():
    """As nnU-Net validates and predicts: every call in an fp16 autocast region of its own, the weights
    changed in between. The graph must cast the live weights each replay, not reuse autocast's cached
    half-precision copies from the region it was captured in (freed when that region ends)."""
    torch.manual_seed(0)
    a = FastInference(MobileViM(input_channels=1, num_classes=3, variant="xs")).cuda().eval()
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
    assert a._runtime.folded is not None and len(a._runtime.runner) == 1
    report("fast inference after new weights, separate fp16 autocast regions, max relative", rel_err(second, expected))
    assert rel_err(second, expected) < FP16_TOL


def test_fast_inference_with_deep_supervision_as_in_validation(no_tf32):
    """nnU-Net validates with deep supervision on and predicts with it off, on the same network object."""
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).cuda()
    net.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        net(torch.randn(2, 1, 64, 64, 64, device="cuda") * 3 + 1)
    net.eval()
    plain = copy.deepcopy(net)
    net = FastInference(net)
    x = torch.randn(2, 1, 64, 64, 64, device="cuda")
    for deep_supervision in (True, False, True):
        net.decoder.deep_supervision = plain.decoder.deep_supervision = deep_supervision
        with torch.no_grad():
            fast, ref = net(x), plain(x)
        fast, ref = (fast, ref) if deep_supervision else ([fast], [ref])
        assert len(fast) == len(ref) == (4 if deep_supervision else 1)
        err = max(rel_err(a, b) for a, b in zip(fast, ref))
        report(f"fast inference, deep supervision {deep_supervision}, max relative", err)
        assert err < FP32_TOL


def test_noop_to_keeps_graphs_in_nnunets_predictor(no_tf32, monkeypatch):
    """[noop_to_keeps_graphs] nnU-Net's predictor moves the network to its device and reloads the weights
    for every case: three cases, one capture, and the predictor's logits equal those it gives with the
    plain network."""
    predict = pytest.importorskip("nnunetv2.inference.predict_from_raw_data")
    captures = []
    real_capture = CUDAGraphRunner._capture
    monkeypatch.setattr(CUDAGraphRunner, "_capture",
                        lambda runner, x: captures.append(x.shape) or real_capture(runner, x))
    torch.manual_seed(0)
    net = FastInference(MobileViM(input_channels=1, num_classes=3, variant="xs")).cuda().eval()
    plain = MobileViM(input_channels=1, num_classes=3, variant="xs").cuda().eval()
    weights = {k: v.clone() for k, v in net.state_dict().items()}

    def predictor_for(network):
        # no Gaussian weighting: nnU-Net accumulates it in fp16, where the border tiles' tiny weights turn
        # 1-ulp differences of the logits into differences of ~0.3 after the division
        predictor = predict.nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                            device=torch.device("cuda"), verbose=False, allow_tqdm=False)
        predictor.network, predictor.list_of_parameters = network, [weights]
        predictor.configuration_manager = SimpleNamespace(patch_size=[48, 48, 48])
        predictor.label_manager = SimpleNamespace(num_segmentation_heads=3)
        predictor.allowed_mirroring_axes = None
        return predictor

    fast_predictor, plain_predictor = predictor_for(net), predictor_for(plain)
    for case in range(3):
        data = torch.randn(1, 64, 72, 64, generator=torch.Generator().manual_seed(case))
        logits = fast_predictor.predict_logits_from_preprocessed_data(data).float()
    assert len(captures) == 1, captures
    expected = plain_predictor.predict_logits_from_preprocessed_data(data).float()
    report("nnU-Net predictor, fast inference vs plain network, max relative", rel_err(logits, expected))
    assert rel_err(logits, expected) < FP16_TOL  # the predictor runs under fp16 autocast


def test_capture_thread_safe_while_another_thread_pins_memory(no_tf32):
    """[capture_thread_safe] nnU-Net's pin-memory thread allocates pinned host memory while validation
    captures an inference graph; a capture that checks every thread ("global" mode) fails then."""
    net = MobileViM(input_channels=1, num_classes=2, variant="xs").cuda().eval()
    runner = CUDAGraphRunner(fold_batchnorm(net))
    stop = threading.Event()

    def pin_memory_thread():
        size = 1 << 16
        while not stop.is_set():
            torch.empty(size, pin_memory=True).fill_(1)  # cudaHostAlloc and event queries, as pin_memory does
            size = size * 2 if size < (1 << 24) else 1 << 16

    thread = threading.Thread(target=pin_memory_thread, daemon=True)
    thread.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for shape in ((1, 1, 64, 64, 64), (1, 1, 64, 80, 64), (2, 1, 64, 64, 64)):
                x = torch.randn(shape, device="cuda")
                out = runner(x)
                with torch.no_grad():
                    assert rel_err(out, net(x)) < FP32_TOL
    finally:
        stop.set()
        thread.join()
    assert len(runner) == 3, [str(w.message) for w in caught]
    assert not [w for w in caught if issubclass(w.category, FastPathWarning)]


# --- training: forward/backward graphs ---------------------------------------------------------------

@pytest.mark.parametrize("amp", [False, True])
def test_graphed_training_matches_eager_over_optimizer_steps(deterministic_cuda, amp):
    """Forward + backward replayed from CUDA graphs give the eager network's deep-supervision outputs and
    gradients, step after step, with new data every step and weights the optimiser changed in place;
    BatchNorm's running statistics as after four eager steps (the warm-up does not count).

    Before every step the eager copies take the graphed copy's weights and statistics, so each step
    compares one step's arithmetic (training would amplify any difference from step to step); the
    second eager run shows what is left of run-to-run noise."""
    torch.manual_seed(0)
    eager = use_torch_scan(MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True))
    eager = eager.cuda().train().to(memory_format=torch.channels_last_3d)  # as the trainers train
    nets = (_Graphed(copy.deepcopy(eager)), eager, copy.deepcopy(eager))  # graphed, ref, twin
    optimizers = [torch.optim.SGD(n.parameters(), lr=1e-2) for n in nets]
    tol = 1e-2 if amp else FP32_TOL
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        _copy_state(nets[0], nets[1:])
        x = torch.randn(2, 1, 64, 64, 64, generator=generator).cuda()
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
        for label, (outs, grads) in (("second eager run", (outs_b, grads_b)), ("graphed", (outs_g, grads_g))):
            err_out = max(rel_err(o, a) for o, a in zip(outs, outs_a))
            err_grad = rel_l2(grads, grads_a)
            report(f"{label} vs eager, {'fp16' if amp else 'fp32'}, step {step}: outputs (max rel) / gradients "
                   f"(rel L2) {err_out:.2e} /", err_grad)
            assert err_out < tol and err_grad < tol, (label, step, err_out, err_grad)
    assert len(nets[0].graphs) == 1  # captured once, replayed after
    stats = [torch.cat([b.float().flatten() for b in n.buffers()]) for n in nets]
    report("graphed vs eager BatchNorm running statistics after the last step, max relative",
           rel_err(stats[0], stats[1]))
    assert rel_err(stats[0], stats[1]) < tol
    counts = [m.num_batches_tracked.item() for m in nets[0].modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert counts and set(counts) == {4}


class _Graphed(torch.nn.Module):
    """``network`` trained through ``TrainingGraphs`` in channels_last_3d (as the trainers train it), with
    the network's parameters and buffers in their order."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network.to(memory_format=torch.channels_last_3d)
        self.graphs = TrainingGraphs(network, network.forward)

    def forward(self, x):
        return self.graphs(x)


def _copy_state(source: torch.nn.Module, targets) -> None:
    """Weights and buffers of ``source`` into each of ``targets`` (in place)."""
    with torch.no_grad():
        for target in targets:
            for a, b in zip(target.parameters(), source.parameters()):
                a.copy_(b)
            for a, b in zip(target.buffers(), source.buffers()):
                a.copy_(b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_graphed_training_accumulates_gradients(deterministic_cuda, set_to_none):
    """Two backward passes without zeroing in between sum their gradients, as in eager PyTorch, also
    when .grad still holds the graph's buffer from the step before."""
    torch.manual_seed(0)
    eager = use_torch_scan(MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True))
    eager = eager.cuda().train()
    graphed = _Graphed(copy.deepcopy(eager))
    eager.to(memory_format=torch.channels_last_3d)
    xs = [torch.randn(2, 1, 64, 64, 64, device="cuda") for _ in range(3)]

    def grads_after(net, batches):
        net.zero_grad(set_to_none=set_to_none)
        for x in batches:
            sum(o.float().square().mean() for o in net(x)).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    grads_after(graphed, xs[:1])  # captures, and leaves .grad pointing at the graph's buffers
    for batches in (xs[1:], xs[:1]):
        expected, got = grads_after(eager, batches), grads_after(graphed, batches)
        report(f"graphed vs eager accumulated gradients over {len(batches)} batch(es), rel L2", rel_l2(got, expected))
        assert rel_l2(got, expected) < FP32_TOL
        # each .grad in its parameter's layout (channels_last_3d weights), as fused optimisers require
        assert all(p.grad.stride() == p.stride() for p in graphed.parameters())


# --- training: the whole step in one graph -----------------------------------------------------------

def _trainer_state(network, optimizer: str):
    """What nnU-Net's train_step and the trainers' step read: nnU-Net's DC+CE deep-supervision loss, the
    optimiser as the trainers build it, GradScaler. (The ignore label's loss: tests/nnunet/test_nnunet_losses.py.)"""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])  # nnU-Net's deep-supervision weights (last one 0), normalised
    if optimizer == "SGD":  # the trainers' SGD (momentum buffers that survive a skipped step)
        from nnunetv2_mobilevim.nnunet.optim import SGD

        opt = SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5, fused=True)
    else:
        opt = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=3e-2, fused=True)
    return SimpleNamespace(device=torch.device("cuda"), network=network, compiled_network=None,
                           enable_deep_supervision=True, optimizer=opt, grad_scaler=torch.amp.GradScaler("cuda"),
                           loss=DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist()))


def _batch(generator):
    labels = torch.randint(0, 3, (2, 1, 64, 64, 64), generator=generator).float()
    return {"data": torch.randn(2, 1, 64, 64, 64, generator=generator).pin_memory(),
            "target": [labels[..., ::f, ::f, ::f].contiguous().pin_memory() for f in (1, 2, 4, 8)]}


def _sync_trainer_state(source, targets) -> None:
    """Weights, buffers, optimiser state and GradScaler of ``source`` into each of ``targets``: every step
    then compares one step's arithmetic, not the run-to-run noise that training amplifies."""
    _copy_state(source.network, [t.network for t in targets])
    for target in targets:
        for p_t, p_s in zip(target.network.parameters(), source.network.parameters()):
            state_s, state_t = source.optimizer.state.get(p_s, {}), target.optimizer.state[p_t]
            for key, value in state_s.items():
                if key in state_t and torch.is_tensor(value):
                    state_t[key].copy_(value)
                else:
                    state_t[key] = value.clone() if torch.is_tensor(value) else value
        target.grad_scaler.load_state_dict(source.grad_scaler.state_dict())


def _flat(state) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in state.network.parameters()])


def _plain_conv_unet():
    """nnU-Net's default architecture (``nnUNetTrainer_Accelerated``'s network for a 3D plan), small: five
    stages, so its four deep-supervision outputs match ``_batch``'s targets; InstanceNorm, LeakyReLU."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 5, (8, 16, 32, 64, 64), nn.Conv3d, 3, (1, 2, 2, 2, 2), 2, 3, (2, 2, 2, 2), True,
                         nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def _step_test_network(name: str) -> nn.Module:
    """Seeded, on CUDA, in training mode: MobileViM_xs on the PyTorch scan in channels_last_3d (the MobileViM
    trainers' layout), or nnU-Net's PlainConvUNet contiguous (``nnUNetTrainer_Accelerated``'s)."""
    torch.manual_seed(0)
    if name == "plainconvunet":
        return _plain_conv_unet().cuda().train()
    net = use_torch_scan(MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True))
    return net.cuda().train().to(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("network", ["mobilevim_xs", "plainconvunet"])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_whole_step_graph_matches_the_eager_step(deterministic_cuda, optimizer, network):
    """The trainers' step replayed from one CUDA graph updates the weights as the same step run eagerly,
    and as nnU-Net's own ``nnUNetTrainer.train_step`` does: nnU-Net's loss, fp16 autocast, GradScaler,
    clipping, the fused optimiser; six steps, the learning rate changed after capture (a scheduler's
    epoch step). Per step the parameter update must be the same bits (no atomic adds are left, so the
    three runs are deterministic); the relative L2 difference is printed. MobileViM_xs in channels_last_3d
    (the MobileViM trainers' layout) and nnU-Net's PlainConvUNet contiguous (``nnUNetTrainer_Accelerated``'s)."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    net = _step_test_network(network)
    nnunet, eager, graphed = (_trainer_state(n, optimizer) for n in (net, copy.deepcopy(net), copy.deepcopy(net)))
    step = GraphedTrainStep(lambda *t: nnUNetTrainerMobileViM._train_step_on_device(graphed, *t), [graphed.optimizer])
    generator = torch.Generator().manual_seed(0)
    moved = False
    for i in range(6):  # 3 eager warm-up steps, capture + replay, replay (new lr), replay
        if i == 4:
            for s in (nnunet, eager, graphed):
                s.optimizer.param_groups[0]["lr"] *= 0.4
        batch = _batch(generator)
        _sync_trainer_state(graphed, (nnunet, eager))
        before = [_flat(s) for s in (nnunet, eager, graphed)]
        nnUNetTrainer.train_step(nnunet, batch)
        eager.optimizer.zero_grad(set_to_none=True)
        nnUNetTrainerMobileViM._train_step_on_device(eager, batch["data"].cuda(), *(t.cuda() for t in batch["target"]))
        step(batch["data"], *batch["target"])
        updates = [_flat(s) - b for s, b in zip((nnunet, eager, graphed), before)]
        moved = moved or bool(updates[1].abs().max() > 0)  # GradScaler may skip early steps (inf)
        err = rel_l2(updates[2], updates[1])
        report(f"{optimizer} step {i}: whole-step graph vs eager step, update rel L2", err)
        assert torch.equal(updates[2], updates[1]), (i, err)
        err_nnunet = rel_l2(updates[1], updates[0])
        report(f"{optimizer} step {i}: eager step vs nnU-Net's train_step, update rel L2", err_nnunet)
        assert torch.equal(updates[1], updates[0]), (i, err_nnunet)
    assert moved and len(step) == 1  # captured once, replayed after
    assert isinstance(graphed.optimizer.param_groups[0]["lr"], float)
    assert graphed.grad_scaler.get_scale() == eager.grad_scaler.get_scale()


@pytest.mark.parametrize("network", ["mobilevim_xs", "plainconvunet"])
def test_whole_step_graph_with_the_compiled_network_matches_nnunets_compiled_step(deterministic_cuda, network):
    """With ``nnUNet_compile`` the trainers' graphed step calls the torch.compile'd network (and nnU-Net's
    compiled Dice) inside the graph: its updates must be the bits of nnU-Net's own ``train_step`` on a
    compiled network (nnU-Net 2.8's default), SGD as the trainers build it, six steps, the learning rate
    changed after capture. Each side compiles its own copy; the graph only removes the launches, so any
    difference is a defect."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    torch._dynamo.reset()
    net = _step_test_network(network)
    copies = (net, copy.deepcopy(net))
    nnunet, graphed = (_trainer_state(torch.compile(n), "SGD") for n in copies)
    graphed.network, graphed.compiled_network = copies[1], graphed.network  # as initialize() arranges them
    # nnU-Net's _build_loss compiles the Dice term as well. Static shapes: with automatic dynamic shapes the
    # first call compiles the Dice for the largest deep-supervision scale alone and the next scale recompiles
    # it for every size, so at step 0 only nnU-Net's side would run that first, static kernel.
    for state in (nnunet, graphed):
        state.loss.loss.dc = torch.compile(state.loss.loss.dc, dynamic=False)
    step = GraphedTrainStep(lambda *t: nnUNetTrainerMobileViM._train_step_on_device(graphed, *t), [graphed.optimizer])
    generator = torch.Generator().manual_seed(0)
    moved = False
    for i in range(6):  # 3 eager warm-up steps (they compile), capture + replay, replay (new lr), replay
        if i == 4:
            for s in (nnunet, graphed):
                s.optimizer.param_groups[0]["lr"] *= 0.4
        batch = _batch(generator)
        _sync_trainer_state(graphed, (nnunet,))
        before = [_flat(s) for s in (nnunet, graphed)]
        nnUNetTrainer.train_step(nnunet, batch)
        step(batch["data"], *batch["target"])
        updates = [_flat(s) - b for s, b in zip((nnunet, graphed), before)]
        moved = moved or bool(updates[0].abs().max() > 0)
        err = rel_l2(updates[1], updates[0])
        report(f"compiled {network} step {i}: whole-step graph vs nnU-Net's compiled train_step, update rel L2", err)
        assert torch.equal(updates[1], updates[0]), (i, err)
    assert moved and len(step) == 1
    torch._dynamo.reset()


def test_silent_fallback_graphed_step_beyond_max_graphs(deterministic_cuda):
    """[silent_fallback] A batch of a signature beyond ``max_graphs`` trains eagerly and says so once; when
    the captured signature comes back, .grad again shows the gradients the graph writes, and the updates
    still equal the eager step's."""
    pytest.importorskip("nnunetv2")
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    torch.manual_seed(0)
    net = use_torch_scan(MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True))
    net = net.cuda().train().to(memory_format=torch.channels_last_3d)
    eager, graphed = (_trainer_state(n, "SGD") for n in (net, copy.deepcopy(net)))
    said = []
    step = GraphedTrainStep(lambda *t: nnUNetTrainerMobileViM._train_step_on_device(graphed, *t),
                            [graphed.optimizer], warmup=1, max_graphs=1, log=said.append)
    generator = torch.Generator().manual_seed(0)

    def small(b):  # the same batch cut to half its depth: a second input signature
        return {"data": b["data"][..., :32, :, :],
                "target": [t[..., :32 // f, :, :] for t, f in zip(b["target"], (1, 2, 4, 8))]}

    for i, shrink in enumerate([False, False, False, True, True, False, False]):
        batch = _batch(generator)
        batch = small(batch) if shrink else batch
        _sync_trainer_state(graphed, (eager,))
        before = [_flat(s) for s in (eager, graphed)]
        eager.optimizer.zero_grad(set_to_none=True)
        nnUNetTrainerMobileViM._train_step_on_device(eager, batch["data"].cuda(), *(t.cuda() for t in batch["target"]))
        step(batch["data"], *batch["target"])
        err = rel_l2(_flat(graphed) - before[1], _flat(eager) - before[0])
        report(f"step {i} ({'second signature, eager' if shrink else 'graphed'}): update rel L2", err)
        assert err < UPDATE_TOL["SGD"], (i, err)
    assert len(step) == 1 and len(said) == 1 and "at most 1" in said[0], said
    captured = {id(g) for _, g in step._graphs[next(iter(step._graphs))].grads}
    assert all(id(p.grad) in captured for p in graphed.network.parameters() if p.grad is not None)


def test_run_ahead_keeps_at_most_steps_unfinished():
    """RunAhead lets the host queue ``steps`` slow steps (a sleeping kernel each) and no more: after every
    call at most ``steps`` recorded steps are unfinished, and the oldest beyond that has finished."""
    from nnunetv2_mobilevim.acceleration.training import RunAhead

    ahead = RunAhead(2)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    events = []
    for _ in range(5):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time per "step"
        ahead.step_queued(device)
        events.append(ahead._queued[-1])
        assert sum(not e.query() for e in events) <= 2
        assert len(ahead) <= 2
    assert events[0].query() and events[2].query()
    assert not events[-1].query()  # the host did not wait for the newest step
    torch.cuda.synchronize()
