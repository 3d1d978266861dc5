"""CPU-only smoke run of the ORIGINAL FlexGen (0.1.8) CLI path, to catch API drift (torch, numpy,
transformers) without a GPU.  Not a benchmark: CUDA calls are stubbed and the "GPU" keeps its
tensors in host memory (its device_type stays CUDA, so FlexGen's placement logic is unchanged).

Usage (with the original installed in DIR and the stand-in hub cache built by setup.sh):
  cd /tmp && PYTHONPATH=DIR HF_HOME=<repo>/.whl_orig/hf_home HF_HUB_OFFLINE=1 \
      python3 <repo>/benchmarks/original_flexgen/cpu_smoke.py [extra flex_opt args]
"""
import argparse
import contextlib
import sys

import torch

import flexgen
from flexgen import flex_opt, pytorch_backend

assert "rebuilt" not in (flexgen.__file__ or ""), flexgen.__file__


class _Stream:
    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass


_orig_empty = torch.empty


def _empty(*args, pin_memory=False, device=None, **kw):
    return _orig_empty(*args, device="cpu" if device is not None else None, **kw)


torch.cuda.Stream = _Stream
torch.cuda.stream = lambda s=None: contextlib.nullcontext()
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.set_device = lambda *a, **k: None
torch.cuda.memory_allocated = lambda *a, **k: 0
torch.cuda.max_memory_allocated = lambda *a, **k: 0
torch.empty = _empty
torch.Tensor.cuda = lambda self, *a, **k: self
torch.Tensor.pin_memory = lambda self, *a, **k: self
torch.Tensor.is_pinned = lambda self, *a, **k: True

_orig_init = pytorch_backend.TorchDevice.__init__


def _init(self, name, *a, **k):
    _orig_init(self, name, *a, **k)
    self.dev = torch.device("cpu")  # keep device_type (CUDA for "cuda:0"), store on the host


pytorch_backend.TorchDevice.__init__ = _init

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    argv = ["--model", "facebook/opt-125m", "--path", "_DUMMY_", "--prompt-len", "32",
            "--gen-len", "4", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
            "--offload-dir", "/tmp/orig_flexgen_offload", "--log-file", "/tmp/orig_flexgen_smoke.log",
            *sys.argv[1:]]
    args = parser.parse_args(argv)
    flex_opt.run_flexgen(args)
    print("SMOKE OK", " ".join(sys.argv[1:]))
