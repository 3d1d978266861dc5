"""The cost model's host terms: aten operations counted per layer on meta tensors, their host cost
(profiled, or the reference figure for older profiles), the compressed cache's operations, the
graph-replay hook, and the terms added for issue 12's validation set (next-stage weight pairing,
activations behind the loads, grouped-query CPU attention)."""
import copy
import math

import pytest
import torch

from flexgen.cli import project_decode_latency
from flexgen.engine import triton_decode
from flexgen.models.registry import resolve_model
from flexgen.optimizer import cost_model as cm
from flexgen.optimizer.cost_model import DEFAULT_PROFILE, Grid, Workload, evaluate, predict
from flexgen.optimizer.op_count import (count_compressed_cache_ops, count_compressed_cache_ops_before,
                                        count_layer_ops)
from flexgen.policy import CompressionConfig, Policy



def _family(name):
    return resolve_model(name).family


def _tiny(family):
    from flexgen.models.llama import LlamaConfig, LlamaFamily
    from flexgen.models.opt import OptConfig, OptFamily
    if family == "opt":
        return OptFamily(OptConfig(name="t", num_hidden_layers=2, hidden_size=64, n_head=4, input_dim=64,
                                   ffn_embed_dim=128, vocab_size=100, max_seq_len=64))
    return LlamaFamily(LlamaConfig(name="t", num_hidden_layers=2, hidden_size=64, n_head=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, max_seq_len=64))


def _kinds(family):
    return [layer.kind for _, layer in cm._layer_types(family)]


def test_llama_layers_issue_more_operations_than_opt():
    opt, llama = (cm.host_ops(_family(n)) for n in ("facebook/opt-6.7b", "meta-llama/Meta-Llama-3-8B"))
    o = dict(zip(_kinds(_family("facebook/opt-6.7b")), opt["decode"]))
    m = dict(zip(_kinds(_family("meta-llama/Meta-Llama-3-8B")), llama["decode"]))
    # RMSNorm in float32, rotary, SwiGLU's extra matmul and product
    assert m["attention"] > o["attention"] and m["mlp"] > o["mlp"]
    assert llama["decode_once"] > 0 == opt["decode_once"]   # rotary angles: once per step, not per layer
    assert all(c > 0 for c in opt["decode"] + llama["decode"])


def test_counts_do_not_depend_on_the_sizes():
    """The same family at two sizes issues the same operations per layer (meta tensors, no data)."""
    a, b = (cm.host_ops(_family(n)) for n in ("facebook/opt-6.7b", "facebook/opt-30b"))
    assert a["decode"] == b["decode"] and a["prefill"] == b["prefill"]


def test_once_per_step_values_are_counted_once():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    attn = next(layer for layer in fam.layers() if layer.kind == "attention")
    per_layer, once = count_layer_ops([attn, attn, attn])
    assert per_layer[0] == per_layer[1] == per_layer[2] and once > 0
    first, _ = count_layer_ops([attn])   # one pass alone would count the angles in the layer
    assert first[0] == per_layer[0]


def test_a_layer_that_cannot_run_on_meta_gets_the_mean():
    """A mixture of experts routes by data (.tolist()): no meta value, so its count is the mean of
    the model's counted layers rather than a failure."""
    fam = _family("mistralai/Mixtral-8x7B-v0.1")
    counts, _ = count_layer_ops([layer for _, layer in cm._layer_types(fam)])
    kinds = _kinds(fam)
    assert counts[kinds.index("moe")] is None
    ops = cm.host_ops(fam)
    assert ops["decode"][kinds.index("moe")] > 0


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_meta_counts_equal_counts_on_real_tensors(family):
    """What the forwards issue on meta tensors is what they issue on real CPU tensors (of the
    same dtype: conversions to float32 are no operation on float32 inputs), except where a GPU
    runs fewer: meta counts LLaMA's RMSNorm as the one kernel a GPU runs, the CPU runs HF's eight
    operations in HF's order (one RMSNorm in each attention, MLP and head layer), and a decode
    softmax in half precision on the CPU goes through float32 (a cast in and out per attention)."""
    layers = _tiny(family).layers()
    norms = [int(family == "llama" and layer.kind in ("attention", "mlp", "head")) for layer in layers]
    for seq in (1, 5):
        (meta, once), (cpu, cpu_once) = (count_layer_ops(layers, seq),
                                         count_layer_ops(layers, seq, device="cpu", dtype=torch.float16))
        casts = [int(seq == 1 and layer.kind == "attention") for layer in layers]
        assert once == cpu_once and cpu == [m + 7 * n + 2 * c for m, n, c in zip(meta, norms, casts)]


@pytest.mark.skipif(triton_decode.triton is None, reason="the kernel needs Triton (a test dependency)")
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_decode_attention_kernel_counts_as_one_operation(family):
    """Inside a graph step (triton_decode.for_graphs) meta tensors count a decode step's attention
    core as the one operator a GPU runs (Triton's two kernels) in place of the matmul path's
    operations, which eager steps (and the cost model's count) run; prefill and the other layers
    unchanged."""
    layers = _tiny(family).layers()
    attn = [layer.kind == "attention" for layer in layers]
    for seq in (1, 5):
        with triton_decode.for_graphs():
            with_kernel = count_layer_ops(layers, seq)
        matmuls = count_layer_ops(layers, seq)
        if seq > 1:
            assert with_kernel == matmuls
            continue
        assert with_kernel[1] == matmuls[1]
        assert all((a < b) if is_attn else (a == b) for a, b, is_attn in zip(with_kernel[0], matmuls[0], attn))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_meta_counts_what_the_gpu_issues(family):
    """On CUDA in fp16 an eager decode step's forwards issue exactly what meta counts (fused RMSNorm
    included): the cost model's host term counts the kernels a GPU launches."""
    from flexgen.optimizer import op_count
    layers = _tiny(family).layers()
    # decode only: a prefill's attention core is counted from the CPU's SDPA (see op_count), which
    # decomposes its mask differently from CUDA's; prefill is compute-bound, its count matters little
    for seq in (1,):
        meta = count_layer_ops(layers, seq)
        meta_names = list(op_count.LAST_NAMES)
        cuda = count_layer_ops(layers, seq, device="cuda", dtype=torch.float16, fused_as_one=False)
        diff = [(dict(m - c), dict(c - m)) for m, c in zip(meta_names, op_count.LAST_NAMES) if m != c]
        assert meta == cuda, (seq, diff)


def test_reference_host_cost_reproduces_p4():
    """A profile without host_op_s takes the reference: P4's 24 ms decode step over OPT-6.7B's
    counted operations, so P4 itself predicts back ~24 ms (host-bound)."""
    prof = copy.deepcopy(DEFAULT_PROFILE)
    assert "host_op_s" not in prof["gpu"]
    pred = predict(_family("facebook/opt-6.7b"), Workload(512, 32), Policy(8, 1, 100, 0, 100, 0, 100, 0), prof)
    assert pred.decode_step_s == pytest.approx(cm.REFERENCE_DECODE_STEP_S, rel=0.05)


def test_profiled_host_cost_is_used_and_scales_host_bound_steps():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    p = Policy(8, 1, 100, 0, 100, 0, 100, 0)
    prof = copy.deepcopy(DEFAULT_PROFILE)
    prof["gpu"]["host_op_s"] = 20e-6
    slow = predict(fam, Workload(512, 32), p, prof).decode_step_s
    prof["gpu"]["host_op_s"] = 10e-6
    fast = predict(fam, Workload(512, 32), p, prof).decode_step_s
    assert fast == pytest.approx(slow / 2, rel=0.05)   # host-bound: time follows the per-op cost
    ops = cm.host_ops(fam)
    per_step = sum(n * c for (n, _), c in zip(cm._layer_types(fam), ops["decode"])) + ops["decode_once"]
    assert slow == pytest.approx(per_step * 20e-6, rel=0.05)


def test_graph_replay_hook_only_changes_eligible_policies():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    resident = Policy(8, 1, 100, 0, 100, 0, 100, 0)
    eager = predict(fam, w, resident, prof)
    graph = predict(fam, w, resident, prof, graph_op_s=1e-6)
    assert graph.decode_step_s < 0.5 * eager.decode_step_s
    assert graph.prefill_s == eager.prefill_s                     # prefill stays eager
    # packed weights and cache on the GPU are captured too: no host work for the packed cache
    # either, and the graph pool's unpacked cache layer counted in the working set
    for packed in (resident.replace(compress_cache=True), resident.replace(compress_weight=True)):
        pg, pe = predict(fam, w, packed, prof, graph_op_s=1e-6), predict(fam, w, packed, prof)
        assert pg.decode_step_s < pe.decode_step_s and pg.prefill_s == pe.prefill_s
        assert pg.memory.gpu == pe.memory.gpu   # the pool counts whether or not graphs are on
    # the pool: the packed cache's layer unpacked (K and V) and attention's copies of them
    from flexgen.optimizer.memory_model import estimate_memory
    one_cache = 2 * 544 * 8 * 8 * 128 * 2   # K + V of a layer, 544 positions x 8 sequences, fp16
    work = {c: estimate_memory(fam, resident.replace(compress_cache=c), 512, 32, True).parts["work"]["gpu"]
            for c in (False, True)}
    assert work[True] - work[False] == 4 * one_cache
    for other in (Policy(8, 1, 100, 0, 50, 50, 100, 0), Policy(8, 1, 90, 10, 100, 0, 100, 0),
                  resident.replace(compress_cache=True, cpu_cache_compute=True)):
        assert predict(fam, w, other, prof, graph_op_s=1e-6).decode_step_s == predict(fam, w, other, prof).decode_step_s
    assert predict(fam, w, resident, prof, graph_op_s=None).decode_step_s == eager.decode_step_s
    g = Grid.of_policy(resident)
    assert cm.graph_eligible(g).tolist() == [True]


def test_fused_cache_write_issues_fewer_operations():
    cfg = CompressionConfig(4, 64, 2, False)
    new, old = count_compressed_cache_ops(8, 128, cfg), count_compressed_cache_ops_before(8, 128, cfg)
    # two segments (GPU + CPU), as N4: one quantise call against one per segment and K/V
    assert new["write"] + 2 * new["write_segment"] < 0.7 * (old["write"] + 2 * old["write_segment"])
    assert new["write"] > 0 and new["unpack"] > 0 and new["unpack_fused"] > 0


def test_compressed_cache_host_terms_grow_with_segments():
    """A packed cache split over GPU and CPU writes and unpacks two segments per layer and batch:
    more host time than the same cache in one segment (host-bound at small batch)."""
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    one = Policy(4, 8, 100, 0, 100, 0, 100, 0, compress_cache=True)
    plain = Policy(4, 8, 100, 0, 100, 0, 100, 0)
    assert predict(fam, w, one, prof).decode_step_s > predict(fam, w, plain, prof).decode_step_s
    ops = cm.cache_host_ops(8, 128, one.comp_cache_config)
    assert ops == count_compressed_cache_ops(8, 128, one.comp_cache_config)


def test_next_stage_weights_overlap_this_stage():
    """Weights on the CPU at 16 x 8 (N2): attention is host-bound, the MLP transfer-bound; the
    MLP's weights load while attention computes, so the step is about the transfer alone, not
    the sum of each stage's worse side."""
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    p = Policy(16, 8, 0, 100, 100, 0, 100, 0)
    step = predict(fam, Workload(512, 32), p, prof).decode_step_s
    transfer = fam.model_bytes() / (prof["gpu"]["h2d_pinned_gib_s"] * (1 << 30))
    assert transfer <= step < 1.15 * transfer
    kinds = _kinds(fam)
    succ = cm._successors(fam)
    assert succ[kinds.index("attention")] == {kinds.index("mlp"): 1.0}
    # 31 of the 32 MLPs are followed by attention, the last by the head: its weights load once
    assert succ[kinds.index("mlp")] == {kinds.index("attention"): 31 / 32, kinds.index("head"): 1 / 32}


def test_offloaded_activations_wait_for_the_loads():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    on_gpu = predict(fam, w, Policy(32, 4, 100, 0, 0, 100, 100, 0), prof).decode_step_s
    on_cpu = predict(fam, w, Policy(32, 4, 100, 0, 0, 100, 0, 100), prof).decode_step_s
    nothing_loaded = predict(fam, w, Policy(32, 4, 100, 0, 100, 0, 0, 100), prof).decode_step_s
    all_gpu = predict(fam, w, Policy(32, 4, 100, 0, 100, 0, 100, 0), prof).decode_step_s
    assert on_cpu > 1.2 * on_gpu                       # compute no longer hides behind the cache loads
    assert nothing_loaded < 1.2 * all_gpu              # nothing in flight to wait for


def test_grouped_query_cpu_attention_is_slower_per_byte():
    prof = copy.deepcopy(DEFAULT_PROFILE)
    r = cm.Rates(prof)
    assert r.gqa_factor(1) == 1.0 and r.gqa_factor(4) == pytest.approx(cm.GQA_CPU_SLOWDOWN_REP4)
    # a profile's rep-4 rate counts where it shows more than the engine's measured slowdown
    prof["cpu"]["attention_rep4_gib_s"] = {"16": prof["cpu"]["attention_gib_s"]["16"] / 3}
    assert cm.Rates(prof).gqa_factor(4) == pytest.approx(3.0)
    prof["cpu"]["attention_rep4_gib_s"] = {"16": prof["cpu"]["attention_gib_s"]["16"] / 1.05}
    assert cm.Rates(prof).gqa_factor(4) == pytest.approx(cm.GQA_CPU_SLOWDOWN_REP4)
    prof["cpu"]["attention_rep4_gib_s"] = {"16": prof["cpu"]["attention_gib_s"]["16"] / 3}
    fam = _family("meta-llama/Meta-Llama-3-8B")
    p = Policy(32, 2, 0, 100, 0, 100, 100, 0, cpu_cache_compute=True)
    slow = predict(fam, Workload(512, 32), p, prof).decode_step_s
    prof["cpu"]["attention_rep4_gib_s"] = dict(prof["cpu"]["attention_gib_s"])
    assert predict(fam, Workload(512, 32), p, prof).decode_step_s < slow


def test_evaluate_matches_predict_on_a_grid():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    from flexgen.optimizer.search import build_grid
    grid = build_grid(gbs=(8, 32), ngb=(1, 4))
    res = evaluate(fam, grid, Workload(512, 32), prof, True)
    for i in range(0, len(grid), max(1, len(grid) // 25)):
        one = predict(fam, Workload(512, 32), grid.policy(i), prof, True)
        assert res["decode_step"][i] == pytest.approx(one.decode_step_s, rel=1e-9)
        assert res["prefill"][i] == pytest.approx(one.prefill_s, rel=1e-9)


def test_cut_run_projection_keeps_the_first_decode_steps():
    """FlexGen's projection: the first two decode steps as measured, the rest at the later mean
    (a cold first step is not multiplied by gen_len - 1)."""
    assert project_decode_latency([0.2, 0.04, 0.03, 0.03, 0.03], 32) == pytest.approx(0.24 + 0.03 * 29)
    assert project_decode_latency([0.05, 0.05], 32) == pytest.approx(0.05 * 31)


def test_profile_measures_host_cost_per_operation_on_the_cpu():
    from flexgen.profile import profile_host_op
    out = profile_host_op("cpu", quick=True)
    assert set(out["host_op_s_by_probe"]) == {"opt", "llama"}
    assert 0 < out["host_op_s"] < 1e-3
    assert torch.get_num_threads() >= 1


def test_search_forwards_the_graph_hook():
    from flexgen.optimizer.memory_model import MachineMemory
    from flexgen.optimizer.search import choose_policy
    fam = _family("facebook/opt-6.7b")
    limits = MachineMemory(gpu=80 << 30, host=100 << 30, disk=100 << 30)
    eager = choose_policy(fam, 512, 32, limits, copy.deepcopy(DEFAULT_PROFILE), gpu_batch_size=8, num_gpu_batches=1)
    graph = choose_policy(fam, 512, 32, limits, copy.deepcopy(DEFAULT_PROFILE), gpu_batch_size=8, num_gpu_batches=1,
                          graph_op_s=1e-6)
    assert cm.graph_eligible(Grid.of_policy(graph.policy)).tolist() == [True]
    assert graph.prediction.decode_step_s < eager.prediction.decode_step_s


# ---- the engine's own scheduling operations (optimizer/engine_ops.py) ------------------------------

ENGINE_POLICIES = [
    Policy(2, 3, 50, 50, 50, 50, 100, 0, compress_weight=True, compress_cache=True),
    Policy(2, 2, 0, 100, 0, 100, 100, 0, cpu_cache_compute=True),
    Policy(2, 2, 100, 0, 0, 100, 0, 100, cpu_cache_compute=True, compress_cache=True),
    Policy(2, 2, 30, 40, 100, 0, 100, 0),   # weights partly on disk
]


def _engine_check(device, is_cuda):
    from flexgen.optimizer import engine_ops
    for family in ("opt", "llama"):
        tiny = _tiny(family)   # 2 layers
        for policy in ENGINE_POLICIES:
            pol = engine_ops._mini_policy(policy, tiny.info().head_dim)
            extra = engine_ops.engine_extra(tiny, pol, device, is_cuda)
            step = engine_ops._count_step(tiny, pol, device)
            # the miniature (other widths, 1 and 3 layers) predicts the real step's count exactly
            assert step == cm.model_decode_ops(tiny, pol, is_cuda) + 2 * extra.per_layer + extra.per_step, \
                (family, policy)
            assert extra.per_layer > 0


def test_engine_extra_is_what_the_engine_issues_beyond_the_model():
    _engine_check("cpu", False)


@pytest.mark.gpu
def test_engine_extra_is_what_the_engine_issues_on_the_gpu():
    _engine_check("cuda", True)


def test_a_pipeline_stage_counts_the_engine_operations_of_its_layers():
    """dist --percent auto counts the engine's operations for a stage (StageFamily.miniature is
    the whole model's): per layer what the whole model's count gives, over the stage's layers."""
    from flexgen.dist.stages import StageFamily, split_stages
    from flexgen.optimizer import engine_ops
    fam = _family("facebook/opt-1.3b")
    ranges = split_stages(fam.layers(), 2)
    policy = Policy(4, 2, 50, 50, 100, 0, 100, 0, compress_weight=True)
    whole = engine_ops.engine_extra(fam, policy, "cpu", False)
    prof, w = copy.deepcopy(DEFAULT_PROFILE), Workload(128, 8)
    for r in ranges:
        stage = StageFamily(fam, r)
        assert engine_ops.engine_extra(stage, policy, "cpu", False) == whole
        base, counted = (predict(stage, w, policy, prof, is_cuda=True, count_on=c) for c in (None, "cpu"))
        assert counted.decode_step_s > base.decode_step_s


def test_counted_engine_operations_lengthen_eager_decode_steps_only():
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    split = Policy(32, 2, 50, 50, 0, 100, 100, 0, cpu_cache_compute=True)
    base, counted = (predict(fam, w, split, prof, is_cuda=True, count_on=c) for c in (None, "cpu"))
    assert counted.decode_step_s > base.decode_step_s and counted.prefill_s == base.prefill_s
    # a replayed graph step keeps its own host cost
    resident = Policy(8, 1, 100, 0, 100, 0, 100, 0)
    g0, g1 = (predict(fam, w, resident, prof, is_cuda=True, graph_op_s=1e-6, count_on=c) for c in (None, "cpu"))
    assert g0.decode_step_s == g1.decode_step_s


def test_search_reranks_its_best_with_the_engine_count():
    from flexgen.optimizer.memory_model import MachineMemory
    from flexgen.optimizer.search import RERANK, build_grid, search
    fam = _family("facebook/opt-1.3b")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    limits = MachineMemory(gpu=2 << 30, host=64 << 30, disk=64 << 30)
    grid = build_grid(gbs=(8,), ngb=(2,))
    plain = search(fam, Workload(128, 8), limits, prof, top=RERANK, grid=grid)
    counted = search(fam, Workload(128, 8), limits, prof, top=3, grid=grid, count_on="cpu")
    tps = [c.prediction.throughput for c in counted]
    assert tps == sorted(tps, reverse=True) and {c.policy for c in counted} <= {c.policy for c in plain}
    for c in counted:
        again = predict(fam, Workload(128, 8), c.policy, prof, is_cuda=True, count_on="cpu")
        assert again.throughput == c.prediction.throughput


def test_cpu_attention_output_waits_behind_the_weight_copy_in_flight():
    """With weights streamed, each GPU batch's CPU attention output goes back to the device behind
    the next stage's weight copy: half the largest copy per layer and GPU batch (N10 against N10
    with resident weights, session 10). Resident weights, or no CPU attention: no wait."""
    fam = _family("meta-llama/Meta-Llama-3-8B")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    streamed = Policy(32, 2, 0, 100, 0, 100, 100, 0, cpu_cache_compute=True)
    resident = streamed.replace(w_gpu_percent=100, w_cpu_percent=0)
    t_s, t_r = (predict(fam, w, p, prof).decode_step_s for p in (streamed, resident))
    mlp = max(math.prod(x.shape) for x in fam.layers()[2].weights) * 2   # the largest MLP weight, fp16
    waits = fam.info().num_layers * 2 * 0.5 * mlp / (prof["gpu"]["h2d_pinned_gib_s"] * cm.GiB)
    assert t_s >= t_r + waits * 0.99


def test_weights_unpack_at_the_rate_of_their_grouping():
    """The profile times the fused unpacking for both weight layouts (groups along dim 0, FlexGen's,
    and along dim 1, the CLI's default); a policy's weights unpack at its own layout's rate, and a
    profile without the dim-1 figure uses the one it has."""
    fam = _family("facebook/opt-30b")
    prof = copy.deepcopy(DEFAULT_PROFILE)
    w = Workload(512, 32)
    dim0 = Policy(32, 3, 20, 80, 100, 0, 100, 0, compress_weight=True)
    dim1 = dim0.replace(comp_weight_config=CompressionConfig(4, 64, 1, False))
    same = [predict(fam, w, p, prof).decode_step_s for p in (dim0, dim1)]
    assert same[0] == same[1]
    prof["gpu"]["dequant_dim1_gelem_s"] = prof["gpu"]["dequant_gelem_s"] / 4
    t0, t1 = (predict(fam, w, p, prof).decode_step_s for p in (dim0, dim1))
    assert t0 == same[0] and t1 > t0


def test_decode_reads_packed_weights_at_the_profiled_rate():
    """With the packed matmul's rate in the profile, a decode step over 4-bit weights grouped along
    the input dim reads their packed bytes at that rate instead of unpacking them; prefill, more
    rows than the kernel takes, FlexGen's grouping (dim 0) and a profile without the rate unpack."""
    fam = _family("facebook/opt-30b")
    w = Workload(512, 32)
    prof = copy.deepcopy(DEFAULT_PROFILE)
    fast = copy.deepcopy(prof)
    fast["gpu"]["packed_matmul_gib_s"] = 1e6   # reading packed weights costs ~nothing
    dim1 = CompressionConfig(4, 64, 1, False)
    p = Policy(16, 1, 100, 0, 100, 0, 100, 0, compress_weight=True, comp_weight_config=dim1)
    slow_p, fast_p = predict(fam, w, p, prof), predict(fam, w, p, fast)
    assert fast_p.prefill_s == slow_p.prefill_s
    assert fast_p.decode_step_s < 0.5 * slow_p.decode_step_s
    wide = p.replace(gpu_batch_size=128)   # over packed_matmul.MAX_ROWS rows: unpacked
    assert predict(fam, w, wide, fast).decode_step_s == predict(fam, w, wide, prof).decode_step_s
    dim0 = p.replace(comp_weight_config=CompressionConfig(4, 64, 0, False))
    assert predict(fam, w, dim0, fast).decode_step_s == predict(fam, w, dim0, prof).decode_step_s
