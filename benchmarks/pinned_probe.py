"""How much host memory does a pinned tensor really take? PyTorch's caching host allocator rounds
each pinned allocation up to a power of two; this shows it (RSS before/after) on the machine.
Usage: python3 benchmarks/pinned_probe.py"""
import torch


def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))


GiB = 1 << 30
for mb in (103, 411, 600):
    before = rss()
    t = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    print(f"pinned {mb} MiB tensor: RSS +{(rss() - before) / (1 << 20):.0f} MiB")
    del t
stats = getattr(torch.cuda.memory, "host_memory_stats", None)
if stats:
    s = stats()
    print({k: v for k, v in s.items() if "bytes" in k and ("current" in k or "peak" in k)})
