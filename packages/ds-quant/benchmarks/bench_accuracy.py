"""(d) Accuracy of a trained ds-small after quantization: perplexity and next-token accuracy.

Compares float32, int8 RTN, int4 RTN and int4 GPTQ (calibrated on training text) in PyTorch, plus
the int4 GPTQ model exported to ONNX and run in onnxruntime (accuracy_level 4, the default CPU
path, and 0, float activations), on held-out text. Targets (issue 7): int4 with the calibrated method within +3% perplexity
of float32 and >= 98% of its next-token accuracy.

    python bench_accuracy.py eval --model DIR --text heldout.txt --calib train.txt --json out.json \
        [--device cuda] [--variants '{"act-order": {"act_order": true}}']

Until ds-trainer provides a trained ds-small, two more steps make one. ds-data's built-in corpus
(100k tokens) is too small to train ds-small on, so `corpus` writes a larger one from the Python
standard library's own source files (about 12 MB of text, no download): a held-out set of whole
files, a byte-level BPE tokenizer (8192) and the token ids. `train` then trains ds-small on it with
a plain AdamW loop (on a GPU in a couple of minutes):

    python bench_accuracy.py corpus --out /tmp/stdlib-corpus
    python bench_accuracy.py train --corpus /tmp/stdlib-corpus --out /tmp/ds-small-trained --seconds 100
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ds_models import ModelConfig, Transformer, load_tokenizer
from ds_quant import QuantConfig, export_directory, quantize, save_quantized, set_backend
from ds_quant.calibration import read_texts, token_stream, windows
from ds_quant.evaluate import evaluate_logits, evaluate_onnx, model_weight_bytes

SEQ_LEN = 256


def make_corpus(out: Path, heldout_share: float = 0.03) -> None:
    """train.txt / heldout.txt from the stdlib's .py files (whole files split by a hash of the path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(p.relative_to(root).parts)
    )  # fmt: skip
    train, held = [], []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        bucket = int(hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest(), 16) % 1000
        (held if bucket < heldout_share * 1000 else train).append(text)
    out.mkdir(parents=True, exist_ok=True)
    sep = "\n<|endoftext|>\n"
    (out / "train.txt").write_text(sep.join(train), encoding="utf-8")
    (out / "heldout.txt").write_text(sep.join(held), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(train, trainer)
    tok.save(str(out / "tokenizer.json"))
    ids = token_stream(train, tok)
    np.save(out / "train_ids.npy", ids.numpy().astype(np.uint16))
    print(f"{len(train)} train files, {len(held)} held out; {ids.numel()} train tokens")


def train(corpus: Path, out: Path, seconds: float, batch: int, device: str, seed: int = 0) -> dict:
    """ds-small trained for `seconds` on corpus/train_ids.npy; saved in bfloat16 shards < 15 MB."""
    from ds_models.checkpoint import save_pretrained

    torch.manual_seed(seed)
    ids = torch.from_numpy(np.load(corpus / "train_ids.npy", allow_pickle=False).astype(np.int64))
    model = Transformer(ModelConfig.from_name("ds-small", max_seq_len=SEQ_LEN)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    start, step, losses = time.time(), 0, []
    while (elapsed := time.time() - start) < seconds:
        frac = elapsed / seconds
        for group in opt.param_groups:  # linear warm-up over 5%, then cosine to 0
            group["lr"] = 2e-3 * min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, ids.numel() - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + SEQ_LEN + 1] for s in starts.tolist()]).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {sum(losses[-200:]) / 200:.3f} ({time.time() - start:.0f}s)", flush=True)
    info = {"steps": step, "tokens": step * batch * SEQ_LEN, "final_loss": sum(losses[-100:]) / min(100, len(losses)),
            "device": device, "seconds": seconds, "corpus": "Python stdlib sources (bench_accuracy.py corpus)"}  # fmt: skip
    model = model.eval().to("cpu", torch.bfloat16)  # bf16 shards: the files must come back from a GPU box
    save_pretrained(model, out, tokenizer=corpus / "tokenizer.json", max_shard_bytes=15_000_000,
                    provenance={"trained_by": "ds-quant/benchmarks/bench_accuracy.py", **info})  # fmt: skip
    print(json.dumps(info))
    return info


def _documents(source: str) -> list[str]:
    """A .txt file as ONE document (this benchmark's corpus joins whole source files with EOS, as
    the model was trained), anything else as ds-quant reads it."""
    return [Path(source).read_text(encoding="utf-8")] if source.endswith(".txt") else read_texts(source)


def evaluate(
    model_dir: Path,
    text: str,
    calib: str,
    max_windows: int,
    device: str = "cpu",
    variants: dict | None = None,
) -> dict:
    tok = load_tokenizer(model_dir)
    base = Transformer.from_pretrained(model_dir, dtype=torch.float32).eval()
    held_out = windows(token_stream(_documents(text), tok), SEQ_LEN, max_windows, flag="--text")
    calib_stream = token_stream(_documents(calib), tok)

    def calib_ids(cfg: QuantConfig) -> torch.Tensor:
        g = cfg.gptq
        return windows(calib_stream, g.seq_len, g.n_samples, seed=g.seed).to(device)

    def on_device(name: str, model) -> object:
        model = model.to(device).eval()
        with set_backend("cached"):  # exact float32 matmuls of the dequantized weights
            return evaluate_logits(
                name, lambda b: model(b.to(device)).cpu(), held_out, 8, model_weight_bytes(model)
            )

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    gptq_cfg = QuantConfig(bits=4, group_size=128, method="gptq", calib=calib)
    rows = [on_device("float32", copy.deepcopy(base))]
    configs = [
        ("int8 rtn", QuantConfig(bits=8, group_size=128)),
        ("int4 rtn", QuantConfig(bits=4, group_size=128)),
        ("int4 gptq", gptq_cfg),
        ("int4 gptq, embed/lm_head int8", QuantConfig(**{**gptq_cfg.to_dict(), "overrides": {"lm_head": 8}})),
    ]
    for name, options in (variants or {}).items():
        configs.append((f"int4 gptq, {name}", QuantConfig(**{**gptq_cfg.to_dict(), "gptq": options})))
    kept = {}
    for name, cfg in configs:
        t = time.time()
        cal = calib_ids(cfg) if cfg.method == "gptq" else None
        kept[name] = quantize(copy.deepcopy(base).to(device), config=cfg, calibration=cal).to("cpu")
        rows.append(on_device(name, copy.deepcopy(kept[name])))
        print(f"{name}: quantize + eval {time.time() - t:.0f}s; ppl {rows[-1].perplexity:.3f}", flush=True)
    onnx_runs = [("int4 gptq", 4), ("int4 gptq", 0)] + [(n, 4) for n, _ in configs[4:]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, level) in enumerate(onnx_runs):  # 4: int8 activations (the CPU default), 0: float
            q, out = Path(tmp) / f"q{i}", Path(tmp) / f"onnx-{i}"
            save_quantized(kept[name], q, tokenizer=model_dir / "tokenizer.json")
            export_directory(q, out, accuracy_level=level)
            rows.append(evaluate_onnx(f"{name} → ONNX, onnxruntime (accuracy_level {level})", out, held_out))
            print(f"{rows[-1].name}: ppl {rows[-1].perplexity:.3f}", flush=True)
    ref = rows[0]
    result = {"model": str(model_dir), "held_out_tokens": ref.tokens, "device": device, "rows": []}
    print(f"\n{'model':60s} {'MB':>7s} {'ppl':>8s} {'Δppl':>8s} {'acc':>7s} {'acc/fp32':>8s}")
    for r in rows:
        d = {"name": r.name, "weight_MB": (r.weight_bytes or 0) / 1e6, "perplexity": r.perplexity,
             "ppl_vs_fp32": r.perplexity / ref.perplexity - 1, "accuracy": r.accuracy,
             "acc_vs_fp32": r.accuracy / ref.accuracy}  # fmt: skip
        result["rows"].append(d)
        print(f"{r.name:60s} {d['weight_MB']:7.2f} {r.perplexity:8.3f} {100 * d['ppl_vs_fp32']:+7.2f}% "
              f"{100 * r.accuracy:6.2f}% {100 * d['acc_vs_fp32']:7.2f}%")  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("corpus", help="write the stdlib corpus, tokenizer and token ids")
    p.add_argument("--out", required=True)
    p = sub.add_parser("train", help="train ds-small on a corpus directory")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = sub.add_parser("eval", help="float vs quantized perplexity / accuracy")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="held-out text (.txt/.jsonl or builtin:validation)")
    p.add_argument("--calib", required=True, help="GPTQ calibration text")
    p.add_argument("--max-windows", type=int, default=128)
    p.add_argument("--device", default="cpu", help="where PyTorch quantizes and evaluates (ONNX: CPU)")
    p.add_argument("--variants", default="{}", help='extra GPTQ rows: JSON {"name": {gptq field: value}}')
    p.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "corpus":
        make_corpus(Path(args.out))
    elif args.cmd == "train":
        train(Path(args.corpus), Path(args.out), args.seconds, args.batch, args.device)
    else:
        result = evaluate(Path(args.model), args.text, args.calib, args.max_windows, args.device,
                          json.loads(args.variants))  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
