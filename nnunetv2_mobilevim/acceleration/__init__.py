"""Speed-ups that leave results unchanged, for any ``nn.Module``: BatchNorm folding and CUDA-graph
replay of inference (``inference``); forward/backward graphs and the whole training step replayed
from one CUDA graph (``training``)."""
