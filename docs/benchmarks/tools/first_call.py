"""Where the first forward of a fast-inference MobileViM spends its time (one process per setting)."""
import json, sys, time
import torch
t0 = time.perf_counter()
bench = sys.argv[1] == "1"
name = sys.argv[2]
torch.backends.cudnn.benchmark = bench
res = {"cudnn_benchmark": bench, "network": name}
if name.startswith("mobilevim"):
    from nnunetv2_mobilevim import MobileViM
    from nnunetv2_mobilevim.scan import load_kernels
    t = time.perf_counter(); load_kernels(); res["load_kernels_s"] = time.perf_counter() - t
    net = MobileViM(input_channels=1, num_classes=4, variant=name.split("_")[1], fast_inference=True).cuda().eval()
else:
    from nnunetv2_mobilevim.benchmark import build
    net = build(name, 1, 4, [128] * 3).cuda().eval()
x = torch.randn(1, 1, 128, 128, 128, device="cuda")
torch.cuda.synchronize()
for i in range(3):
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        net(x)
    torch.cuda.synchronize()
    res[f"call{i}_s"] = time.perf_counter() - t
t = time.perf_counter()
with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
    for _ in range(50):
        net(x)
torch.cuda.synchronize()
res["steady_ms"] = (time.perf_counter() - t) / 50 * 1000
print(json.dumps(res))
