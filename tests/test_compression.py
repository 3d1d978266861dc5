"""Group-wise quantisation: round trips, the packing layout, fewer bytes stored, and generation
with compressed weights and cache giving the same tokens in every placement and the tokens of
simulated compression (quantise then dequantise the weights, same math) in transformers."""
import numpy as np
import pytest
import torch

import tiny_models
from conftest import DEVICE_TYPE
from flexgen.memory.compression import compress, decompress, packed_shapes
from flexgen.memory.placement import PackedBuffer, TieredBuffer
from flexgen.policy import CompressionConfig, Policy, PolicyError


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group_dim,group", [((130, 77), 0, 64), ((130, 77), 1, 64), ((3, 5, 7, 96), 3, 32),
                                                   ((9, 33), -1, 8), ((1, 2), 1, 2)])
def test_round_trip_within_bound(bits, symmetric, shape, group_dim, group):
    cfg = CompressionConfig(bits, group, group_dim, symmetric)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    p = compress(x, cfg)
    data_shape, meta_shape, min_shape = packed_shapes(shape, cfg)
    assert p.data.dtype == torch.uint8 and tuple(p.data.shape) == data_shape
    assert tuple(p.scale.shape) == meta_shape and (p.mn is None) == symmetric
    y = decompress(p, torch.float32)
    assert y.shape == x.shape
    # Each value is within half a quantisation step of its group (+ fp16 rounding of scale/min).
    dim = group_dim % len(shape)
    xg = torch.nn.functional.pad(x.movedim(dim, -1), (0, (-shape[dim]) % group)).reshape(*p.scale.shape[:-1], group)
    if symmetric:
        step = xg.abs().amax(-1) / ((1 << (bits - 1)) - 1)
    else:
        step = (xg.amax(-1) - xg.amin(-1)) / ((1 << bits) - 1)
    err = torch.nn.functional.pad((y - x).abs().movedim(dim, -1), (0, (-shape[dim]) % group))
    err = err.reshape(*p.scale.shape[:-1], group).amax(-1)
    assert (err <= step * 0.5 + 2e-3 * xg.abs().amax(-1) + 1e-6).all()


def test_packing_layout_is_stable():
    """Two 4-bit values per byte, the first in the low nibble; scale and min per group in fp16."""
    x = torch.arange(16, dtype=torch.float32)[None]
    p = compress(x, CompressionConfig(4, 16, 1, False))
    assert p.data.tolist() == [[[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]]
    assert p.scale.item() == 1.0 and p.mn.item() == 0.0
    assert torch.equal(decompress(p, torch.float32), x)
    p8 = compress(x, CompressionConfig(8, 16, 1, False))
    assert p8.data.flatten().tolist()[:3] == [0, 17, 34]  # 255 levels over 0..15


def test_packed_buffer_stores_fewer_bytes(tmp_path):
    from flexgen.env import ExecutionEnv
    env = ExecutionEnv.create(str(tmp_path), device="cpu")
    cfg = CompressionConfig(4, 64, 0, False)
    full = TieredBuffer(env, (1024, 512), torch.float16, (0, 50, 50))
    packed = PackedBuffer(env, (1024, 512), torch.float16, cfg, (0, 50, 50))
    for tier in ("cpu", "disk"):
        ratio = packed.nbytes_on(tier) / full.nbytes_on(tier)
        assert ratio == pytest.approx((64 * 4 + 2 * 16) / (64 * 16)), (tier, ratio)  # 4 bits + 2 fp16 per 64
    import os
    on_disk = sum(os.path.getsize(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path) if f.endswith(".bin"))
    assert on_disk == full.nbytes_on("disk") + packed.nbytes_on("disk")
    full.close(), packed.close(), env.close_copy_threads()


def test_bad_compression_config_is_refused():
    with pytest.raises(PolicyError):
        Policy(1, 1, 100, 0, 100, 0, 100, 0, compress_weight=True, comp_weight_config=CompressionConfig(3, 64, 0))
    with pytest.raises(PolicyError):
        Policy(1, 1, 100, 0, 100, 0, 100, 0, compress_cache=True, comp_cache_config=CompressionConfig(4, 7, 2))


PLACES = ["all_compute", "weights_cpu_disk", "cache_disk", "mixed_ngb3", "all_disk", "mixed_no_overlap",
          "cache_split_cpu_attn", "cache_cpu_disk_cpu_attn_ngb3"]


def _policy(placement, bits, weight=True, cache=True):
    return tiny_models.make_policy(placement, compress_weight=weight, compress_cache=cache,
                                   comp_weight_config=CompressionConfig(bits, 16, 0, False),
                                   comp_cache_config=CompressionConfig(bits, 8, 2, bits == 8))


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_placement_gives_the_same_tokens(open_lm, name, bits):
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    prompts = tiny_models.make_prompts(7, 10, kw["vocab_size"], pad, seed=2)
    outs = {}
    for placement in PLACES:
        with open_lm(name, _policy(placement, bits)) as lm:
            outs[placement] = lm.generate(prompts, max_new_tokens=8)
    base = outs["all_compute"]
    for placement, out in outs.items():
        if DEVICE_TYPE == "cuda" and "cpu_attn" in placement:
            # fp16 attention on the CPU and on the GPU round differently: a near-tie of a tiny
            # random model may flip one token, and the rest of that sequence follows the flip
            # (on the H200 the GQA model's CPU attention placements had 6-7 of 56 tokens differ,
            # all after one flip). Every other sequence must agree exactly.
            differs = [i for i in range(len(out)) if not np.array_equal(out[i], base[i])]
            assert len(differs) <= 1, (placement, differs)
            continue
        assert np.array_equal(out, base), placement


@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="exact float32 comparison")
@pytest.mark.parametrize("name", ["opt-tiny-proj", "llama-tiny-tied"])
def test_weight_compression_equals_simulated(zoo, open_lm, name):
    """Our packed weights give exactly the tokens of transformers running on weights that were
    quantised and dequantised with the same config (the transformer layers' matrices; embeddings
    and the output head stay uncompressed)."""
    import copy
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    cfg = CompressionConfig(4, 16, 0, False)
    ref = copy.deepcopy(zoo.reference(name))
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if p.dim() >= 2 and ".layers." in pname:
                p.copy_(decompress(compress(p.data, cfg), torch.float32))
    prompts = tiny_models.make_prompts(4, 10, kw["vocab_size"], pad, seed=4)
    with open_lm(name, _policy("mixed", 4, cache=False)) as lm:
        out = lm.generate(prompts, max_new_tokens=8)
    cmp = tiny_models.compare_to_reference(ref, family, out, 10, pad)
    tiny_models.assert_matches_reference(cmp, DEVICE_TYPE, what=f"{name} compressed weights")
