"""Tensor-parallel inference (ds_models.parallel) in 2 real gloo processes on CPU, against the
single-process model: logits, greedy and seeded sampling, the meta-device build, and the benchmark
script itself under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ds_core
import ds_models
from ds_models import ModelConfig, ModelError, Transformer, generate
from ds_models.parallel import check_tp_size, local_config

PROMPTS = [[5, 17, 42, 7, 99, 3], [8, 9, 10]]  # two lengths: the second row is left-padded
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tp_decode.py"

# Runs on every rank; writes rank<r>.pt with what the test compares against one process.
WORKER = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from ds_models import ModelError, generate
    from ds_models.parallel import ParallelDecoder, build_parallel, generate_parallel, load_parallel
    src, untied, bad, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    res = {}
    model = load_parallel(src, mesh, dtype=torch.float32)
    attn = model.layers[0].self_attn
    res["local"] = (attn.n_heads, attn.n_kv_heads, tuple(attn.q_proj.weight.to_local().shape),
                    tuple(model.layers[0].mlp.down_proj.weight.to_local().shape))
    res["dtensor"] = isinstance(attn.q_proj.weight, DTensor)
    from ds_models.checkpoint import _local_part  # the part of each stored weight a rank reads
    res["read"] = {n: _local_part(w)[1] for n, w in (("q", attn.q_proj.weight), ("o", attn.o_proj.weight),
                                                     ("norm", model.norm.weight))}
    with torch.no_grad():
        res["logits"] = model(torch.tensor([PROMPTS[0]]))
    res["greedy"] = generate_parallel(model, PROMPTS, 12)
    res["generate_delegates"] = generate(model, PROMPTS, 12) == res["greedy"]
    res["sampled"] = generate_parallel(model, PROMPTS, 12, temperature=0.8, top_k=50, seed=3)
    res["unseeded"] = generate_parallel(model, PROMPTS, 8, temperature=1.0)
    # Untied (ds-67b's layout): lm_head is vocab-parallel, the logits all-gathered.
    model = load_parallel(untied, mesh, dtype=torch.float32)
    res["untied_lm_head"] = tuple(model.lm_head.weight.to_local().shape)
    with torch.no_grad():
        res["untied_logits"] = model(torch.tensor([PROMPTS[0]]))
    res["untied_greedy"] = generate_parallel(model, PROMPTS, 12)
    for what, fn in {
        "bad_load": lambda: load_parallel(bad, mesh),
        "bad_mode": lambda: ParallelDecoder(model, 1, 16, mode="cuda-graph"),
    }.items():
        try:
            fn()
        except ModelError as e:
            res[what] = str(e)
    built = build_parallel("ds-tiny", mesh, dtype=torch.float32, seed=0)
    with torch.no_grad():
        res["built_logits"] = built(torch.tensor([PROMPTS[0]]))
    res["built_state"] = {k: v.full_tensor() if isinstance(v, DTensor) else v
                          for k, v in built.state_dict().items()}
    torch.save(res, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    """
).replace("PROMPTS", repr(PROMPTS))


def _env() -> dict[str, str]:
    # The torchrun workers import ds_models / ds_core from wherever this process does.
    src = [str(Path(m.__file__ or "").resolve().parents[1]) for m in (ds_core, ds_models)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([*src, env.get("PYTHONPATH", "")])
    return env


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """({"tied", "untied"} single-process models, rank-0 results, rank-1 results) of one 2-process run."""
    tmp = tmp_path_factory.mktemp("tp")
    models = {}
    for name, tied in (("tied", True), ("untied", False)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("ds-tiny", tie_embeddings=tied)).eval()
        with torch.no_grad():  # varied tokens under greedy decoding (registry init echoes the prompt)
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(tmp / name)
        models[name] = model
    Transformer(ModelConfig.from_name("ds-tiny", n_kv_heads=1)).save_pretrained(tmp / "bad")
    (tmp / "worker.py").write_text(WORKER)
    _torchrun(str(tmp / "worker.py"), *(str(tmp / d) for d in ("tied", "untied", "bad")), str(tmp))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return models, ranks[0], ranks[1]


@pytest.mark.slow
def test_shards_hold_local_heads(tp_run):
    _, res, other = tp_run
    assert res["dtensor"]
    # ds-tiny: 4 query heads, 2 kv heads, head_dim 16, d_ff 160 -> per rank 2 / 1 heads, 80 neurons.
    assert res["local"] == (2, 1, (32, 64), (64, 80))
    # load_parallel reads each rank's rows of q (colwise), columns of o (rowwise), and all of a
    # replicated norm
    whole = slice(None)
    assert res["read"] == {"q": (slice(0, 32), whole), "o": (whole, slice(0, 32)), "norm": None}
    assert other["read"] == {"q": (slice(32, 64), whole), "o": (whole, slice(32, 64)), "norm": None}


@pytest.mark.slow
def test_logits_match_one_process(tp_run):
    models, res, other = tp_run
    model = models["tied"]
    with torch.no_grad():
        ref = model(torch.tensor([PROMPTS[0]]))
    torch.testing.assert_close(res["logits"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other["logits"], res["logits"], atol=0, rtol=0)  # the same on both ranks


@pytest.mark.slow
def test_generate_matches_one_process(tp_run):
    models, res, other = tp_run
    model = models["tied"]
    assert res["greedy"] == generate(model, PROMPTS, 12) == other["greedy"]
    assert res["generate_delegates"] and other["generate_delegates"]  # generate() on a sharded model
    assert len(set(res["greedy"][0])) > 3  # varied tokens: a real comparison
    sampled = generate(model, PROMPTS, 12, temperature=0.8, top_k=50, seed=3)
    assert res["sampled"] == sampled == other["sampled"]
    # No seed: rank 0 draws one for all, so both ranks still sample the same tokens.
    assert res["unseeded"] == other["unseeded"]


@pytest.mark.slow
def test_vocab_parallel_lm_head_matches_one_process(tp_run):
    models, res, other = tp_run
    model = models["untied"]
    assert res["untied_lm_head"] == (256, 64)  # half of the 512-token vocabulary per rank
    with torch.no_grad():
        ref = model(torch.tensor([PROMPTS[0]]))
    torch.testing.assert_close(res["untied_logits"], ref, atol=1e-5, rtol=1e-5)
    assert res["untied_greedy"] == generate(model, PROMPTS, 12) == other["untied_greedy"]


@pytest.mark.slow
def test_meta_build_matches_its_gathered_weights(tp_run):
    _, res, _ = tp_run
    state = res["built_state"]
    full = Transformer(ModelConfig.from_name("ds-tiny")).eval()
    full.load_state_dict(state)
    with torch.no_grad():
        ref = full(torch.tensor([PROMPTS[0]]))
    torch.testing.assert_close(res["built_logits"], ref, atol=1e-5, rtol=1e-5)
    # The registry init ran on the shards: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers).
    assert state["layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert state["layers.1.mlp.down_proj.weight"].std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(state["norm.weight"], torch.ones(64))
    assert not state["layers.0.self_attn.q_proj.bias"].any()


@pytest.mark.slow
def test_bad_sizes_and_modes_raise_clear_errors(tp_run):
    _, res, _ = tp_run
    assert res["bad_load"].startswith("n_kv_heads: 1 is not divisible by the tensor-parallel size 2")
    assert "cuda-graph needs a CUDA mesh" in res["bad_mode"]


def test_check_tp_size_names_the_field():
    config = ModelConfig.from_name("ds-67b")  # 64 query heads, 8 kv heads
    check_tp_size(config, 8)
    with pytest.raises(ModelError, match="n_kv_heads: 8 is not divisible by the tensor-parallel size 16"):
        check_tp_size(config, 16)
    with pytest.raises(ModelError, match="n_heads: 64 is not divisible by the tensor-parallel size 3"):
        check_tp_size(config, 3)
    with pytest.raises(ModelError, match="dense models only"):
        check_tp_size(ModelConfig.from_name("ds-tiny", sparse_ratio=0.5), 2)


def test_local_config_keeps_head_dim():
    config = ModelConfig.from_name("ds-67b")
    local = local_config(config, 2)
    assert (local.n_heads, local.n_kv_heads, local.head_dim) == (32, 4, config.head_dim)
    assert local.n_layers == config.n_layers


@pytest.mark.slow
def test_benchmark_script_runs_under_torchrun(tmp_path):
    out = tmp_path / "tp.json"
    args = ["--model", "ds-tiny", "--device", "cpu", "--backend", "gloo", "--dtype", "fp32"]
    args += ["--prompt-len", "16", "--new-tokens", "8", "--batch", "2", "--out", str(out)]
    _torchrun(str(BENCH), *args)
    result = json.loads(out.read_text())
    assert (result["tp"], result["batch"], result["model"]) == (2, 2, "ds-tiny")
    eager = result["decode"]["eager"]
    assert eager["steps"] == 7 and eager["tok_per_s"] == pytest.approx(2 / (eager["median_step_ms"] / 1e3))
    assert result["checks"] == {"eager_same_tokens_on_all_ranks": True, "full_model_logits_close": True}
    assert result["full_model"]["rel_diff"] < 1e-5 and result["full_model"]["top1_agree"] == 1.0
    # Each rank holds half of every block matrix (and q/k/v bias) plus the replicated rest (tied).
    model = Transformer(ModelConfig.from_name("ds-tiny"))
    sharded = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sum(
        p.numel() * 4 // (2 if any(s in name for s in sharded) else 1) for name, p in model.named_parameters()
    )
    assert [m["weight_bytes"] for m in result["memory"]] == [expected, expected]
