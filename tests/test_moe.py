"""The mixture-of-experts layer: routing and grouped expert compute against transformers' own
MixtralSparseMoeBlock, compression of experts (router kept), the memory and cost models'
accounting (every expert's bytes, only the routed share of FLOPs), the known names and the CLI
for the new families."""
import os

import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE
from flexgen.models.moe import route_top_k, routed_experts
from flexgen.models.registry import resolve_model
from flexgen.optimizer.cost_model import DEFAULT_PROFILE, Workload, _weight_table, predict
from flexgen.optimizer.memory_model import estimate_memory
from flexgen.policy import CompressionConfig, Policy


def _hf_block(experts, top_k, hidden=32, inter=24, seed=0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                        num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.weight[:, 0] += torch.linspace(2, -2, experts)   # uneven: low experts win most
    return block


def _ours(block, x):
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    experts, weights = route_top_k(torch.nn.functional.linear(x, block.gate.weight), block.top_k)

    def expert(e, xe):
        gate, up = torch.nn.functional.linear(xe, gu[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[e])

    return routed_experts(x, experts, weights, expert, gu.shape[0]), experts


@pytest.mark.parametrize("experts,top_k,tokens", [(8, 2, 40), (6, 2, 3), (5, 3, 17), (4, 1, 9)])
def test_routed_experts_equal_transformers_block(experts, top_k, tokens):
    """Our routing (softmax in float32, top-k, renormalised) and grouped compute give
    transformers' MixtralSparseMoeBlock output, including experts that get no token."""
    block = _hf_block(experts, top_k)
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(tokens))
    x[0, :, 0] = 1.0
    with torch.no_grad():
        theirs = block(x)[0]
        ours, chosen = _ours(block, x[0])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    counts = torch.bincount(chosen.reshape(-1), minlength=experts)
    assert counts.max() > counts.min()   # uneven routing
    if tokens * top_k < experts:
        assert (counts == 0).any()


def test_routed_experts_no_token_loop_matches_naive():
    """Against a per-token loop in float64 (the definition)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 8, dtype=torch.float64, generator=g)
    mats = torch.randn(5, 8, 8, dtype=torch.float64, generator=g)
    experts, weights = route_top_k(torch.randn(13, 5, dtype=torch.float64, generator=g), 2)
    got = routed_experts(x, experts, weights.double(), lambda e, xe: xe @ mats[e].T, 5)
    want = torch.stack([sum(weights[t, j].double() * (x[t] @ mats[experts[t, j]].T) for j in range(2))
                        for t in range(13)])
    torch.testing.assert_close(got, want)
    assert torch.allclose(weights.sum(-1), torch.ones(13, dtype=weights.dtype))


@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="CPU allocations, exact float32 comparison")
@pytest.mark.parametrize("placement", ["all_compute", "mixed_all_tiers", "mixed_no_sep_layer"])
def test_compressed_experts_equal_simulated_and_memory_model_exact(zoo, open_lm, placement):
    """4-bit weights: every expert packed, the router at full precision; greedy tokens equal
    transformers' on weights quantised and dequantised the same way; the memory model counts the
    store's bytes on each tier."""
    import copy
    from flexgen.memory.compression import compress, decompress
    from flexgen.memory.placement import PackedBuffer
    name = "mixtral-tiny"
    cfg = CompressionConfig(4, 16, 0, False)
    ref = copy.deepcopy(zoo.reference(name))
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if p.dim() >= 2 and ".layers." in pname and not pname.endswith("mlp.gate.weight"):
                for m in (p.data if p.dim() == 3 else [p.data]):   # transformers stacks the experts
                    m.copy_(decompress(compress(m, cfg), torch.float32))
    prompts = T.make_prompts(4, 10, 320, T.pad_id_of(name), seed=4)
    policy = T.make_policy(placement, compress_weight=True, comp_weight_config=cfg)
    with open_lm(name, policy) as lm:
        moe = [j for j, layer in enumerate(lm.layers) if layer.kind == "moe"]
        assert len(moe) == 2
        home = lm.weights.homes[moe[0]]
        assert not isinstance(home["router"], PackedBuffer)
        assert all(isinstance(home[f"experts.{e}.{w}"], PackedBuffer) for e in range(6) for w in ("gate_up", "down"))
        est = estimate_memory(lm.family, policy, 10, 6, is_cuda=False)
        for tier in ("gpu", "cpu", "disk"):
            assert est.parts["weights"].get(tier, 0) == pytest.approx(lm.weights.nbytes_on(tier), rel=0.02), tier
        out = lm.generate(prompts, max_new_tokens=8)
    cmp = T.compare_to_reference(ref, "mixtral", out, 10, T.pad_id_of(name))
    T.assert_matches_reference(cmp, DEVICE_TYPE, what=f"{name} compressed weights")


def test_mixtral_8x7b_bytes_and_routed_flops():
    """All experts' bytes are weights (46.7B parameters); a token runs top_k / num_experts of the
    experts' FLOPs; one decode token reads only its experts, a large block reads them all."""
    family = resolve_model("mistralai/Mixtral-8x7B-v0.1").family
    assert family.model_bytes() / 2 / 1e9 == pytest.approx(46.7, rel=0.01)
    rows = _weight_table(family, (100, 0, 0), False, 2, CompressionConfig(4, 64, 0, False))
    moe = next(r for r in rows if r["kind"] == "moe")
    h, inter = 4096, 14336
    experts_elems = 8 * 3 * h * inter
    assert moe["flops"] == pytest.approx(2 * (8 * h + experts_elems * 2 / 8))
    assert moe["tiers"]["gpu"] == 2 * (8 * h + experts_elems + h)     # every expert, router, norm
    from flexgen.optimizer.cost_model import _matmul_read
    assert _matmul_read(moe, 1) == pytest.approx(2 * (8 * h + experts_elems / 4))
    assert _matmul_read(moe, 512) == pytest.approx(2 * (8 * h + experts_elems))


def test_moe_decode_time_follows_the_bytes_not_the_dense_flops():
    """Weights streamed from CPU: the decode step is bounded by moving all experts (the same as a
    dense model of equal bytes) plus unpacking them: packed weights are unpacked on the compute
    stream when their stage runs, which overlaps only the next stage's load (an attention layer's,
    small), as the engine's schedule does."""
    family = resolve_model("mistralai/Mixtral-8x7B-v0.1").family
    policy = Policy(16, 4, 0, 100, 100, 0, 100, 0, compress_weight=True)
    pred = predict(family, Workload(512, 32), policy, DEFAULT_PROFILE, is_cuda=True)
    est = estimate_memory(family, policy, 512, 32, True)
    cpu_bytes = est.parts["weights"]["cpu"]
    floor = cpu_bytes / (DEFAULT_PROFILE["gpu"]["h2d_pinned_gib_s"] * (1 << 30))
    unpack = 46.7e9 / (DEFAULT_PROFILE["gpu"]["dequant_gelem_s"] * 1e9)   # every expert, once a step
    assert floor + 0.5 * unpack <= pred.decode_step_s <= 1.3 * (floor + unpack)
    assert cpu_bytes / 1e9 == pytest.approx(46.7e9 * 4.5 / 8 / 1e9, rel=0.05)   # 4 bits + fp16 scale/min per 64


@pytest.mark.parametrize("name,family_cls,params_b,kv,window", [
    ("Qwen/Qwen2.5-7B", "LlamaFamily", 7.62, 4, None), ("Qwen/Qwen2.5-14B-Instruct", "LlamaFamily", 14.77, 8, None),
    ("Qwen/Qwen2.5-32B", "LlamaFamily", 32.76, 8, None), ("Qwen/Qwen2.5-72B-Instruct", "LlamaFamily", 72.71, 8, None),
    ("mistralai/Mistral-7B-v0.3", "LlamaFamily", 7.25, 8, None),
    ("mistralai/Mistral-7B-Instruct-v0.3", "LlamaFamily", 7.25, 8, None),
    ("mistralai/Mistral-7B-v0.1", "LlamaFamily", 7.24, 8, 4096),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "MixtralFamily", 46.70, 8, None),
    ("mistralai/Mixtral-8x22B-v0.1", "MixtralFamily", 140.6, 8, None),
    ("mistralai/Mixtral-8x22B-Instruct-v0.1", "MixtralFamily", 140.6, 8, None),
])
def test_known_names(name, family_cls, params_b, kv, window):
    r = resolve_model(name, "llama")
    assert type(r.family).__name__ == family_cls and r.hub_name == name
    assert r.family.model_bytes() / 2 / 1e9 == pytest.approx(params_b, rel=0.01)
    assert r.family.info().num_kv_heads == kv and r.family.config.sliding_window == window
    if "Qwen" in name:
        assert r.family.config.qkv_bias and not r.family.config.attention_bias
        assert any(w.key == "qkv.bias" for w in r.family.layers()[1].weights)


@pytest.mark.parametrize("name", ["qwen2-tiny", "mistral-tiny-swa", "mixtral-tiny"])
def test_flex_llama_cli_runs_a_checkpoint_dir(zoo, tmp_path, capsys, name):
    """python3 -m flexgen.flex_llama --model DIR takes any of the new families (read from config.json)."""
    from flexgen.flex_llama import main
    main(["--model", zoo.checkpoint(name), "--path", str(tmp_path / "w"), "--offload-dir", str(tmp_path / "off"),
          "--prompt-len", "12", "--gen-len", "4", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
          "--percent", "30", "40", "50", "25", "0", "100", "--device", "cpu", "--no-log", "--verbose", "1"])
    out = capsys.readouterr().out
    assert "total throughput" in out and "<LlamaLM>" in out


def test_flex_opt_refuses_the_new_families(zoo):
    from flexgen.models.registry import ModelNotFound
    with pytest.raises(ModelNotFound, match="flexgen.flex_llama"):
        resolve_model(zoo.checkpoint("mixtral-tiny"), "opt")


def test_unusable_moe_config_is_a_user_error(tmp_path):
    import json
    from flexgen.models.registry import ModelNotFound
    d = tmp_path / "bad"
    d.mkdir()
    cfg = dict(architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=320, num_local_experts=2, num_experts_per_tok=3)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFound, match="num_experts_per_tok"):
        resolve_model(str(d))


def test_vectorised_memory_matches_estimate_memory_for_moe():
    """The search's vectorised accounting is estimate_memory's, experts and MoE working set included."""
    from flexgen.optimizer.cost_model import Grid, evaluate
    family = resolve_model("mistralai/Mixtral-8x7B-v0.1").family
    for pol in (Policy(16, 4, 0, 100, 100, 0, 100, 0, compress_weight=True),
                Policy(8, 2, 20, 50, 50, 50, 0, 100, compress_cache=True, cpu_cache_compute=True),
                Policy(1, 1, 10, 10, 0, 0, 100, 0)):
        for cuda in (True, False):
            est = estimate_memory(family, pol, 512, 32, cuda)
            got = evaluate(family, Grid.of_policy(pol), Workload(512, 32), DEFAULT_PROFILE, cuda, memory_only=True)
            for k in ("gpu", "pinned", "pageable", "disk"):
                assert got[k][0] == pytest.approx(getattr(est, k), rel=1e-9, abs=1), (pol, cuda, k)


def test_moe_working_set_covers_one_expert_taking_every_token():
    """The prefill working set of a MoE layer: top-k gathered copies and one expert's
    up-projection over the whole GPU batch (more than a dense layer of the same width)."""
    from flexgen.optimizer.memory_model import intermediate_elems
    family = resolve_model("mistralai/Mixtral-8x7B-v0.1").family
    assert intermediate_elems(family.layers(), 4096) == 4096 * (3 + 2 * 2) + 2 * 14336 * 3 // 2
    dense = resolve_model("mistralai/Mistral-7B-v0.3").family
    assert intermediate_elems(dense.layers(), 4096) == 4 * max(32768 // 4, 4096)   # the dense rule (vocab widest)


@pytest.mark.parametrize("name", ["opt-tiny", "mixtral-tiny"])
def test_family_neutral_entry_point(zoo, tmp_path, capsys, name):
    """python3 -m flexgen.flex_model picks flex_opt or flex_llama from the checkpoint itself."""
    from flexgen.flex_model import main
    main(["--model", zoo.checkpoint(name), "--path", str(tmp_path / "w"), "--offload-dir", str(tmp_path / "off"),
          "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2", "--device", "cpu", "--no-log",
          "--verbose", "1"])
    out = capsys.readouterr().out
    assert ("<OptLM>" if name.startswith("opt") else "<LlamaLM>") in out and "total throughput" in out


def test_family_neutral_entry_point_unknown_model(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "flexgen.flex_model", "--model", "no-such-model"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model 'no-such-model'"), r.stderr
