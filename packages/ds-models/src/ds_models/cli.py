"""`ds-models` command line: info, import-hf, generate.

Exit codes: 0 ok, 1 failed, 2 bad input (one line on stderr: `ds-models: error: <what>`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ds_models.config import REGISTRY, ModelConfig, ModelError

PROG = "ds-models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# End-of-text tokens of common tokenizers (ds-data's, Qwen2's, Llama's, DeepSeek's).
EOS_STRINGS = ("<|endoftext|>", "</s>", "<|end▁of▁sentence|>", "<|im_end|>", "<eos>")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog=PROG, description="The ds model family: sizes, Hugging Face import, generation.",
                     formatter_class=fmt)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "info", help="parameters and memory (weights, KV cache) per precision", formatter_class=fmt
    )
    p.add_argument("name", help=f"registry name ({', '.join(REGISTRY)}), a model directory or a config.yaml")
    p.add_argument(
        "--seq-len", type=int, default=None, help="KV cache length (default: the config's max_seq_len)"
    )
    p.add_argument("--batch", type=int, default=1, help="KV cache batch size")

    p = sub.add_parser(
        "import-hf", help="convert a Hugging Face Llama/Qwen2 checkpoint directory", formatter_class=fmt
    )
    p.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors [+ tokenizer.json])")
    p.add_argument("dst", help="ds model directory to write")
    p.add_argument("--dtype", choices=["keep", *DTYPES], default="keep", help="cast weights to this dtype")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard weight files above this size (GiB)")

    p = sub.add_parser("generate", help="continue a prompt with a model directory", formatter_class=fmt)
    p.add_argument("--model", required=True, help="ds model directory (needs tokenizer.json)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: as stored (bf16 on cuda)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "import-hf":
            return _import_hf(args)
        return _generate(args)
    except ModelError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a failure, not bad input: still one line, exit 1
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _info(args) -> int:
    from ds_models.footprint import count_parameters, footprint_rows, human_bytes, human_count

    name = args.name
    if name in REGISTRY:
        config = ModelConfig.from_name(name)
    else:
        path = Path(name)
        path = path / "config.yaml" if path.is_dir() else path
        if not path.exists():
            raise ModelError(
                f"{name}: not a registry name ({', '.join(REGISTRY)}), model directory or config.yaml"
            )
        config = ModelConfig.from_yaml(path)
    if args.seq_len is not None and args.seq_len < 1:
        raise ModelError(f"--seq-len: expected a positive integer, got {args.seq_len}")
    if args.batch < 1:
        raise ModelError(f"--batch: expected a positive integer, got {args.batch}")
    seq_len = args.seq_len or config.max_seq_len
    n = count_parameters(config)
    c = config
    print(f"{name}: {human_count(n)} parameters ({n:,})")
    print(
        f"  vocab {c.vocab_size}, d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads "
        f"({c.n_kv_heads} kv, head_dim {c.head_dim}), d_ff {c.d_ff}, qkv_bias {c.qkv_bias}, "
        f"tied {c.tie_embeddings}, sparse_ratio {c.sparse_ratio}, attention_sparse_ratio {c.attention_sparse_ratio}"
    )
    header = ("precision", "weights", "KV / token", f"KV @ {seq_len} x {args.batch}", "total")
    rows = [
        (r["precision"], human_bytes(r["weights"]), human_bytes(r["kv_per_token"]), human_bytes(r["kv_cache"]),
         human_bytes(r["total"]))
        for r in footprint_rows(config, seq_len, args.batch)
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(
            "  "
            + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    return 0


def _import_hf(args) -> int:
    from ds_models.hf_import import import_hf

    if args.max_shard_gb <= 0:
        raise ModelError(f"--max-shard-gb: expected a positive number, got {args.max_shard_gb}")
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    config = import_hf(
        args.src,
        args.dst,
        dtype=dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {args.dst} ({config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size})")
    return 0


def _generate(args) -> int:
    from ds_models.checkpoint import load_tokenizer
    from ds_models.generate import generate
    from ds_models.model import Transformer

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a model directory")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ModelError(f"{model_dir / 'tokenizer.json'}: missing (generate needs the model's tokenizer)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device: {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device: {args.device}: CUDA is not available here")
    dtype = DTYPES.get(args.dtype)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model = Transformer.from_pretrained(model_dir, device=device, dtype=dtype)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ModelError("--prompt: encodes to no tokens")
    stops = [i for s in EOS_STRINGS if (i := tokenizer.token_to_id(s)) is not None]
    generated: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    for step in generate(
        model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_tokens=stops, seed=args.seed, stream=True,
    ):  # fmt: skip
        tok = step[0]
        if tok is None or tok in stops:
            break
        generated.append(tok)
        # Decode the whole continuation each time: byte-level BPE tokens may split a character.
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(generated)[len(shown) :] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
