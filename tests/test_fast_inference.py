"""Speed-ups must not change results: BatchNorm folding on the CPU (CUDA graphs: tests/test_gpu_kernels.py)."""

import torch
from torch import nn

from nnunetv2_mobilevim import MobileViM
from nnunetv2_mobilevim.fast_inference import fold_batchnorm


def test_folded_network_gives_the_same_logits():
    net = MobileViM(input_channels=1, num_classes=3, variant="xs")
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    folded = fold_batchnorm(net)
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    remaining = sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    total = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert remaining == 0 and total > 50
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == total  # the original is untouched


def test_fast_inference_flag_is_inert_on_the_cpu():
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", fast_inference=True).eval()
    plain = MobileViM(input_channels=1, num_classes=2, variant="xs").eval()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
    assert net._runtime.fast is None


def test_graph_training_flag_is_inert_on_the_cpu_and_copies_start_empty():
    """On the CPU the flag changes nothing (outputs and gradients equal the plain network's), and a deep
    copy (nnU-Net's checkpoint handling, fold_batchnorm) never carries captured state along."""
    import copy

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True)
    plain = copy.deepcopy(net)
    net.enable_cuda_graph_training()  # graphs (CUDA only) + channels_last_3d weights
    assert net.cuda_graph_training and net.encoder.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 32)
    outs, refs = net(x), plain(x)
    assert isinstance(outs, list) and len(outs) == len(refs) == 4
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in refs).backward()
    def rel(a, b):  # the channels_last convolutions sum in another order: compare at the tensor's scale
        return ((a - b).abs().max() / b.abs().max()).item()

    assert max(rel(o, r) for o, r in zip(outs, refs)) < 1e-4
    grads = [torch.cat([p.grad.flatten() for p in n.parameters()]) for n in (net, plain)]
    assert rel(*grads) < 1e-4
    assert net._runtime.training_graphs is None
    net._runtime.training_graphs = object()  # stands in for captured graphs
    assert copy.deepcopy(net)._runtime.training_graphs is None
    net.to("cpu")
    assert net._runtime.training_graphs is None  # moving the network drops what was captured


def test_graphed_backward_puts_gradients_on_grad_and_accumulates():
    """The gradient deposit of a replayed backward, on the CPU with the graph replaced by a function
    that writes the next gradients into the step's buffers (the GPU test replays real graphs)."""
    from nnunetv2_mobilevim.graphed_training import _CapturedStep

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
