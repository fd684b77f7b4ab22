"""Speed-ups must not change results: BatchNorm folding and fast inference on the CPU (the CUDA graph
simulated; the real one: test_gpu_graphs.py)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from nnunetv2_mobilevim import MobileViM
from nnunetv2_mobilevim.acceleration import inference as fast_inference
from nnunetv2_mobilevim.acceleration.inference import FastInference, Refold, fold_batchnorm


def test_folded_network_gives_the_same_logits():
    net = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=3, variant="xs")).eval()
    folded = fold_batchnorm(net)
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    remaining = sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    total = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert remaining == 0 and total > 50
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == total  # the original is untouched


def _mixed_network() -> nn.Module:
    """Every case a fold meets: conv without bias -> BN, transposed conv -> BN, a BN after no conv (kept), a
    conv without BN, 2D beside 3D, a non-affine BN."""
    return nn.Sequential(
        nn.Sequential(nn.BatchNorm3d(2), nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4), nn.ReLU()),
        nn.Sequential(nn.ConvTranspose3d(4, 3, 2, stride=2), nn.BatchNorm3d(3, affine=False), nn.Conv3d(3, 3, 1)),
        nn.Sequential(nn.Flatten(1, 2), nn.Conv2d(3 * 8, 2, 3), nn.BatchNorm2d(2)))


@pytest.mark.parametrize("make", [lambda: MobileViM(input_channels=1, num_classes=3, variant="xs"), _mixed_network],
                         ids=["mobilevim_xs", "mixed"])
def test_refold_writes_what_folding_again_gives_into_the_same_tensors(make):
    """[refold_exact] After training changes weights and running statistics, Refold leaves the folded copy
    bit for bit equal to a fresh fold of the network (in the copy's memory format), in the tensors it had."""
    net = make()
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    with torch.no_grad():
        for m in norms:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    folded = fold_batchnorm(net).to(memory_format=torch.contiguous_format)
    refold = Refold(net, folded)
    kept = sum(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in folded.modules())
    assert len(refold.fused) == len(norms) - kept > 0
    before = {k: (t.data_ptr(), t.stride()) for k, t in folded.state_dict(keep_vars=True).items()}
    x = torch.randn(2, *((1, 32, 32, 32) if isinstance(net, MobileViM) else (2, 6, 8, 8)))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    out = net(x)
    (out[0] if isinstance(out, (list, tuple)) else out).square().mean().backward()  # running stats move too
    opt.step()
    net.eval()
    refold()
    fresh = fold_batchnorm(net).to(memory_format=torch.contiguous_format).state_dict()
    now = folded.state_dict(keep_vars=True)
    assert list(now) == list(fresh) and {k: (t.data_ptr(), t.stride()) for k, t in now.items()} == before
    assert [k for k in fresh if not torch.equal(now[k], fresh[k])] == []
    with torch.no_grad():
        ref, got = (o[0] if isinstance(o, (list, tuple)) else o for o in (net(x), folded(x)))
    assert _rel(got, ref) < 1e-5


def test_fast_inference_is_inert_on_the_cpu():
    torch.manual_seed(0)
    plain = MobileViM(input_channels=1, num_classes=2, variant="xs").eval()
    net = FastInference(copy.deepcopy(plain)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    assert net._runtime.folded is None


def test_fast_inference_is_a_drop_in_for_the_network():
    """The wrapper reads and writes the network's checkpoints (same keys in the same order, module
    versions kept), names mismatching keys as the checkpoint does, trains the same parameters, and
    passes nnU-Net's deep-supervision switch through."""
    torch.manual_seed(0)
    plain = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True))
    net = FastInference(copy.deepcopy(plain))
    saved, expected = net.state_dict(), plain.state_dict()
    assert list(saved) == list(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert saved._metadata == expected._metadata
    assert [id(p) for p in net.parameters()] == [id(p) for p in net.network.parameters()]

    other = MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True)
    net.load_state_dict(other.state_dict())  # a plain network's checkpoint into the wrapper
    assert torch.equal(net.network.encoder.stem[0].weight, other.encoder.stem[0].weight)
    plain.load_state_dict(net.state_dict())  # and back
    assert torch.equal(plain.encoder.stem[0].weight, other.encoder.stem[0].weight)

    broken = other.state_dict()
    broken["extra.weight"] = broken.pop("encoder.stem.0.weight")
    with pytest.raises(RuntimeError) as err:
        net.load_state_dict(broken)
    assert '"encoder.stem.0.weight"' in str(err.value) and '"extra.weight"' in str(err.value)
    assert "network." not in str(err.value)

    net.decoder.deep_supervision = False  # as nnU-Net's set_deep_supervision_enabled does it
    assert net.network.decoder.deep_supervision is False and net.config.name == plain.config.name


def test_fast_inference_copies_start_empty_and_real_moves_drop_what_was_built():
    """A deep copy never carries captured state along; a move that moves nothing keeps it (nnU-Net's
    predictor calls .to(device) per case), new tensors drop it."""
    net = FastInference(MobileViM(input_channels=1, num_classes=2, variant="xs"))
    net._runtime.folded = object()  # stands in for the captured copy
    assert copy.deepcopy(net)._runtime.folded is None
    net.to("cpu")
    assert net._runtime.folded is not None
    net.to(torch.float64).to(torch.float32)
    assert net._runtime.folded is None


def test_training_graphs_are_inert_on_the_cpu():
    """On the CPU ``TrainingGraphs`` runs the network itself: outputs and gradients equal the plain
    network's (here in channels_last_3d, as the trainer trains it)."""
    from nnunetv2_mobilevim.acceleration.training import TrainingGraphs

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True)
    plain = copy.deepcopy(net)
    net.to(memory_format=torch.channels_last_3d)
    graphs = TrainingGraphs(net, net.forward)
    x = torch.randn(2, 1, 32, 32, 32)
    outs, refs = graphs(x), plain(x)
    assert isinstance(outs, list) and len(outs) == len(refs) == 4
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in refs).backward()
    # the channels_last convolutions sum in another order: compare at the tensor's scale
    assert max(_rel(o, r) for o, r in zip(outs, refs)) < 1e-4
    grads = [torch.cat([p.grad.flatten() for p in n.parameters()]) for n in (net, plain)]
    assert _rel(*grads) < 1e-4
    assert len(graphs) == 0


def test_graphed_backward_puts_gradients_on_grad_and_accumulates():
    """The gradient deposit of a replayed backward, on the CPU with the graph replaced by a function
    that writes the next gradients into the step's buffers (the GPU test replays real graphs)."""
    from nnunetv2_mobilevim.acceleration.training import _CapturedStep

    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    buffers = [torch.empty(3), torch.empty(2)]
    incoming = iter([1.0, 10.0, 100.0])

    class FakeGraph:
        def replay(self):  # a backward whose gradient is the incoming scalar everywhere
            value = next(incoming)
            for buf in buffers:
                buf.fill_(value)

    step = _CapturedStep.__new__(_CapturedStep)  # skip capture: needs CUDA
    step.static_grad_outputs, step.backward_graph = [torch.empty(1)], FakeGraph()
    step._lent = list(zip(params, buffers))

    step.backward([torch.ones(1)])  # .grad was None: it now refers to the step's buffer
    assert all(p.grad is buf for p, buf in zip(params, buffers)) and params[0].grad[0] == 1.0
    step.backward([torch.ones(1)])  # no zeroing in between: sums, and keeps the first value
    assert torch.equal(params[0].grad, torch.full((3,), 11.0)) and params[0].grad is not buffers[0]
    for p in params:
        p.grad = None  # nnU-Net's zero_grad(set_to_none=True)
    step.backward([torch.ones(1)])
    assert torch.equal(params[1].grad, torch.full((2,), 100.0))


# --- the fast inference path on the CPU: everything but the CUDA graph itself -------------------------

@pytest.fixture
def cpu_replay(monkeypatch):
    """Let ``FastInference`` networks take their fast path on CPU tensors, with the CUDA graph
    replaced by an object that keeps the graph's contract: fixed input and output buffers, and a
    ``replay()`` that recomputes the outputs from the live weights of the captured module (as a
    replayed graph reads the live parameters it was captured on). Records every capture."""
    from torch.utils._pytree import tree_flatten

    captures = []

    class FakeGraph:
        def __init__(self, module, static_in, static_out):
            self.module, self.static_in, self.static_out = module, static_in, static_out

        def replay(self):
            fresh = tree_flatten(self.module(self.static_in))[0]
            for buf, value in zip(tree_flatten(self.static_out)[0], fresh):
                buf.copy_(value)

    def fake_capture(runner, x):
        captures.append((runner, tuple(x.shape)))
        static_in = x.clone()
        static_out = runner.module(static_in)
        return FakeGraph(runner.module, static_in, static_out), static_in, static_out

    monkeypatch.setattr(fast_inference, "replay_possible", lambda x: True)
    monkeypatch.setattr(fast_inference.CUDAGraphRunner, "_capture", fake_capture)
    return captures


def _randomise_batchnorm(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine parameters (a new network's fold is ~identity)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fast_path_runs_the_folded_copy_and_follows_new_weights(cpu_replay):
    """The fast path replays a BatchNorm-folded copy; new weights (load_state_dict, as nnU-Net's
    predictor does per case; an optimiser step between train() and eval(), as in validation) reach it."""
    plain = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=3, variant="xs")).eval()
    other = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=3, variant="xs")).eval()
    net = FastInference(copy.deepcopy(plain)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert _rel(net(x), plain(x)) < 1e-5
        assert len(cpu_replay) == 1
        runner = cpu_replay[0][0]
        assert not any(isinstance(m, nn.BatchNorm3d) for m in runner.module.modules())  # folded
        assert _rel(net(x + 1), plain(x + 1)) < 1e-5  # replay with new data

        net.load_state_dict(other.state_dict())
        assert _rel(net(x), other(x)) < 1e-5
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    opt.step()
    net.eval()
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert _rel(net(x), plain(x)) < 1e-5
    assert len(cpu_replay) == 1  # the same captured copy throughout: weights copied into it


def test_noop_to_keeps_graphs_real_moves_do_not(cpu_replay):
    """[noop_to_keeps_graphs] nnU-Net's predictor calls network.to(device) for every case: a move that
    moves nothing keeps the folded copy and its graphs; a new dtype or layout rebuilds them."""
    net = FastInference(_randomise_batchnorm(MobileViM(input_channels=1, num_classes=2, variant="xs"))).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = net(x)
        for _ in range(3):
            net.to("cpu")
            net.to(torch.device("cpu"), torch.float32)
            torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
        assert len(cpu_replay) == 1
        net.to(torch.float64).to(torch.float32)  # same values in new tensors: the graphs read the old ones
        assert _rel(net(x), expected) < 1e-6
        assert len(cpu_replay) == 2 and cpu_replay[1][0] is not cpu_replay[0][0]
        net.to(memory_format=torch.channels_last_3d)  # new layout
        assert _rel(net(x), expected) < 1e-5
        assert len(cpu_replay) == 3


def test_graph_cache_bounded(cpu_replay):
    """[graph_cache_bounded] At most max_graphs captures; further input shapes run eagerly with the same
    logits, and a FastPathWarning says so once."""
    from nnunetv2_mobilevim.acceleration.inference import CUDAGraphRunner, FastPathWarning

    net = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=2, variant="xs")).eval()
    runner = CUDAGraphRunner(net, max_graphs=2)
    shapes = [(1, 1, 32, 32, 32), (1, 1, 32, 48, 32), (1, 1, 48, 32, 32), (1, 1, 32, 32, 48)]
    inputs = [torch.randn(s) for s in shapes]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in inputs + inputs:
            torch.testing.assert_close(runner(x), net(x), rtol=0, atol=0)
    assert len(runner) == 2 and len(cpu_replay) == 2
    said = [w for w in caught if issubclass(w.category, FastPathWarning)]
    assert len(said) == 1 and "more than 2 input signatures" in str(said[0].message)


def test_capture_thread_safe_failed_capture_falls_back_once(monkeypatch):
    """[capture_thread_safe] A capture that fails (e.g. another thread used CUDA in a way the capture
    forbids) leaves the caller with eager logits and one FastPathWarning that names the error."""
    from nnunetv2_mobilevim.acceleration.inference import CUDAGraphRunner, FastPathWarning

    def failing_capture(runner, x):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CUDAGraphRunner, "_capture", failing_capture)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs").eval()
    runner = CUDAGraphRunner(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [runner(x) for _ in range(3)]
        expected = net(x)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    said = [w for w in caught if issubclass(w.category, FastPathWarning)]
    assert len(said) == 1 and "not permitted when stream is capturing" in str(said[0].message)
    assert len(runner) == 0


def test_capture_thread_safe_every_capture_checks_only_its_thread():
    """[capture_thread_safe] nnU-Net's pin-memory thread uses CUDA while we capture during training and
    validation: every CUDA-graph capture in the package must use capture_error_mode="thread_local"
    (the default "global" mode fails the capture when another thread makes an unsafe call)."""
    import ast
    from pathlib import Path

    import nnunetv2_mobilevim

    calls = []
    for path in Path(nnunetv2_mobilevim.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "graph"
                    and ast.unparse(node.func.value) == "torch.cuda"):
                modes = [ast.literal_eval(k.value) for k in node.keywords if k.arg == "capture_error_mode"]
                calls.append((path.name, node.lineno, modes))
    assert len(calls) >= 4, calls  # inference, forward and backward of the training graphs, the whole step
    assert all(modes == ["thread_local"] for _, _, modes in calls), calls


def test_fast_path_follows_the_deep_supervision_switch(cpu_replay):
    """nnU-Net validates with deep supervision on and predicts with it off, on one network: each
    setting gets its own capture and the outputs of the plain network in that setting."""
    plain = _randomise_batchnorm(MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True))
    net = FastInference(copy.deepcopy(plain)).eval()
    plain.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        outs, refs = net(x), plain(x)
        assert isinstance(outs, list) and len(outs) == len(refs) == 4
        assert max(_rel(o, r) for o, r in zip(outs, refs)) < 1e-5
        net.decoder.deep_supervision = plain.decoder.deep_supervision = False
        out = net(x)
        assert isinstance(out, torch.Tensor) and _rel(out, plain(x)) < 1e-5
    assert len(cpu_replay) == 2
