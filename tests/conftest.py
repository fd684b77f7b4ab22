import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """True float32 on CUDA: cuDNN's default TF32 convolutions would amplify 1e-7 differences to ~1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic_cuda(no_tf32):
    """cuDNN restricted to deterministic algorithms, autotuned once per convolution (the process-wide
    cache makes eager and captured runs use the same algorithm), cuBLAS with a fixed workspace."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, True
    yield
    cudnn.deterministic, cudnn.benchmark = saved
