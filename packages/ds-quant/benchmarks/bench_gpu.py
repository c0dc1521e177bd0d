"""ds-1.5b shape, random weights, on a CUDA GPU: int4 (PyTorch int4pack path) vs bf16 decode tokens/s.

Batch-1 greedy decoding through ds_models.generate in each of its modes: ``eager`` (the same Python
loop for both models), ``compile`` (torch.compile(mode="reduce-overhead", fullgraph=True): the int4
QuantLinears must trace without graph breaks, reading the int4pack weights they prepared when the
model was moved to the GPU) and ``cuda-graph`` (the eager step captured once). The int4 model is
ds_quant.quantize(bits=4, group_size=128) with QuantLinear's int4pack backend
(torch._weight_int4pack_mm, bf16 activations). onnxruntime's CUDA provider is timed too when the
installed onnxruntime has it (int4 ONNX export of the same model, ds_quant.OnnxModel).

    PYTHONPATH=packages/ds-core/src:packages/ds-models/src:packages/ds-quant/src \
        python packages/ds-quant/benchmarks/bench_gpu.py --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ds_models import ModelConfig, Transformer, generate
from ds_quant import quantize


def tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, mode: str) -> tuple[float, list[int]]:
    generate(model, prompt, max_new_tokens=8, mode=mode)  # warm-up (and compile / capture)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=new_tokens, mode=mode)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t), out[0]


def onnx_cuda_tokens_per_s(q, prompt: torch.Tensor, new_tokens: int) -> float:
    from ds_quant import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        model = copy.deepcopy(q).to("cpu", torch.float32)
        export_onnx(model, tmp, metadata={"ds.config": json.dumps(model.config.to_dict())}, accuracy_level=0)
        del model
        om = OnnxModel(tmp, providers=["CUDAExecutionProvider"])
        rows = prompt.tolist()
        om.generate(rows, 4)
        t = time.perf_counter()
        om.generate(rows, new_tokens)
        return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}, "tokens": {}}

    def save():
        if args.json:  # after every row: a run cut short still reports what it measured
            Path(args.json).write_text(json.dumps(out, indent=2))

    prompt = torch.randint(0, 151936, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    def record(name, fn):
        t = time.time()
        try:
            result = fn()
            tps, tokens = result if isinstance(result, tuple) else (result, None)
            out["rows"][name] = tps
            if tokens is not None:
                out["tokens"][name] = tokens
            print(f"{name}: {tps:.1f} tok/s ({time.time() - t:.0f}s incl. warm-up)", flush=True)
        except Exception as e:  # one failing row must not lose the others
            out["rows"][name] = f"error: {e!r:.300}"
            traceback.print_exc()
        save()

    torch.manual_seed(0)
    config = ModelConfig.from_name("ds-1.5b", max_seq_len=4096)
    with torch.device("cuda"):
        bf16 = Transformer(config).to(torch.bfloat16).eval()
    for mode in ("eager", "compile", "cuda-graph"):
        record(f"bf16 {mode}", lambda m=mode, model=bf16: tokens_per_s(model, prompt, args.new_tokens, m))
    t = time.time()
    q = quantize(copy.deepcopy(bf16).float(), bits=4, group_size=128).to(torch.bfloat16)
    out["quantize_s"] = time.time() - t
    del bf16
    torch.cuda.empty_cache()
    n_prepared = sum(getattr(m, "int4_weight", None) is not None for m in q.modules())
    out["int4pack_prepared_linears"] = n_prepared
    print(f"quantized in {out['quantize_s']:.0f}s; {n_prepared} linears prepared for int4pack", flush=True)
    for mode in ("eager", "compile", "cuda-graph"):
        record(f"int4 {mode}", lambda m=mode: tokens_per_s(q, prompt, args.new_tokens, m))
    out["weight_bytes"] = {"int4": sum(t.numel() * t.element_size() for t in q.state_dict().values())}
    out["int4_compile_equals_eager_tokens"] = out["tokens"].get("int4 compile") == out["tokens"].get(
        "int4 eager"
    )
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime_providers"] = []
    if "CUDAExecutionProvider" in out["onnxruntime_providers"]:
        record("int4 ONNX, onnxruntime CUDA", lambda: onnx_cuda_tokens_per_s(q, prompt, args.new_tokens))
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "tokens"}, indent=2))


if __name__ == "__main__":
    main()
