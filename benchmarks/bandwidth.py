"""Host<->device copy bandwidth (pinned and pageable), the number every offloading floor uses.
Usage: python3 benchmarks/bandwidth.py [GiB]"""
import sys

import torch


def gib_per_s(src, dst, reps=5):
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return src.numel() * src.element_size() / 2**30 / times[len(times) // 2]


def main():
    n = int(float(sys.argv[1] if len(sys.argv) > 1 else 2) * 2**30)
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    pageable = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"host->device pinned:   {gib_per_s(pinned, gpu):6.1f} GiB/s")
    print(f"host->device pageable: {gib_per_s(pageable, gpu):6.1f} GiB/s")
    print(f"device->host pinned:   {gib_per_s(gpu, pinned):6.1f} GiB/s")


if __name__ == "__main__":
    main()
