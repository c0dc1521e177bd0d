"""``ds-quant`` command line: quantize, export --onnx, generate, verify, eval.

Exit codes: 0 ok, 1 failed (verify outside tolerance, unexpected errors), 2 bad input with one
line on stderr: ``ds-quant: error: <file or flag>: <what>``. Outputs are built in a temporary
directory beside the target and renamed at the end; an existing target needs --force.

Quantization settings come from defaults, then ``--config quant.yaml`` (QuantConfig fields),
then the flags given, then ``key=value`` overrides (``overrides.lm_head=8``, ``gptq.n_samples=32``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

PROG = "ds-quant"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _bits(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit width, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog=PROG, formatter_class=fmt,
                     description="int8/int4 quantization, ONNX export with KV cache, onnxruntime inference.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def quant_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--group-size", type=int, default=None, help="values per scale (default 128)")
        p.add_argument("--asym", action="store_true", help="asymmetric (zero points) instead of symmetric")

    p = sub.add_parser("quantize", help="quantize a model directory to int4/int8", formatter_class=fmt)
    p.add_argument("--model", required=True, help="float ds model directory")
    p.add_argument("--out", required=True, help="quantized model directory to write")
    p.add_argument("--bits", type=_bits, default=None, help="4 or 8 (default 4)")
    quant_flags(p)
    p.add_argument(
        "--method", choices=["rtn", "gptq"], default=None, help="round-to-nearest or GPTQ (default rtn)"
    )
    p.add_argument("--calib", default=None,
                   help="GPTQ calibration text, read by ds-data (ds-quant[calib]): a .txt/.jsonl file or 'builtin'")  # fmt: skip
    p.add_argument("--keep", nargs="*", default=[], metavar="PATTERN",
                   help="module-name patterns kept in float, e.g. lm_head 'layers.0.*'")  # fmt: skip
    p.add_argument("--config", default=None, help="YAML file of QuantConfig fields")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "set", nargs="*", metavar="KEY=VALUE", help="QuantConfig overrides, e.g. overrides.lm_head=8"
    )

    p = sub.add_parser("export", help="export a model directory to ONNX", formatter_class=fmt)
    p.add_argument("--onnx", action="store_true", required=True, help="export format (ONNX, the only one)")
    p.add_argument("--model", required=True, help="ds model directory, float or quantized")
    p.add_argument("--out", required=True, help="directory to write model.onnx and friends into")
    p.add_argument("--bits", type=_bits, default=None,
                   help="4|8 (MatMulNBits, RTN-quantizes a float model), 16 (float16 weights), 32; "
                        "default: a quantized model's bits, else 32")  # fmt: skip
    quant_flags(p)
    p.add_argument("--accuracy-level", type=int, choices=[0, 4], default=4,
                   help="MatMulNBits accuracy_level: 4 = int8 activations on CPU (fast), 0 = float activations")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("generate", help="generate text with an exported ONNX model", formatter_class=fmt)
    p.add_argument("--onnx", required=True, help="exported directory")
    p.add_argument("--prompt", required=True, help="prompt text (or space-separated token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="--prompt holds token ids; print token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")

    p = sub.add_parser("verify", help="onnxruntime vs PyTorch logits parity", formatter_class=fmt)
    p.add_argument("--onnx", required=True, help="exported directory")
    p.add_argument(
        "--model", default=None, help="source model directory (default: the one recorded at export)"
    )
    p.add_argument("--prompts", type=int, default=4, help="random prompts")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")

    p = sub.add_parser(
        "eval", help="perplexity and next-token accuracy, float vs quantized", formatter_class=fmt
    )
    p.add_argument("--model", required=True, help="float ds model directory (needs tokenizer.json)")
    p.add_argument("--text", default="builtin:validation",
                   help="held-out text, read by ds-data (ds-quant[calib]): a .txt/.jsonl file or builtin:validation")  # fmt: skip
    p.add_argument(
        "--bits", type=_bits, nargs="+", default=[32, 8, 4], help="precisions to compare (32, 8, 4)"
    )
    p.add_argument(
        "--method", choices=["rtn", "gptq"], nargs="+", default=["rtn"], help="methods for 8/4 bits"
    )
    quant_flags(p)
    p.add_argument("--calib", default="builtin:train", help="GPTQ calibration text")
    p.add_argument("--keep", nargs="*", default=[], metavar="PATTERN", help="module patterns kept in float")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window")
    p.add_argument("--max-windows", type=int, default=64, help="windows evaluated (non-overlapping)")
    p.add_argument("--onnx", nargs="*", default=[], help="exported directories to evaluate too")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


# --- helpers ----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def quant_config_from_args(args: argparse.Namespace):
    """Defaults <- --config YAML <- flags <- key=value."""
    from ds_quant.errors import DsQuantError
    from ds_quant.quantize import QuantConfig

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DsQuantError(f"--config: {args.config}: file not found") from None
        except yaml.YAMLError:
            raise DsQuantError(f"--config: {args.config}: invalid YAML") from None
        if not isinstance(loaded, dict):
            raise DsQuantError(f"--config: {args.config}: expected a mapping of QuantConfig fields")
        data.update(loaded)
    for flag, key in (
        ("bits", "bits"),
        ("group_size", "group_size"),
        ("method", "method"),
        ("calib", "calib"),
    ):
        value = getattr(args, flag, None)
        if value is not None and not isinstance(value, list):
            data[key] = value
    if getattr(args, "asym", False):
        data["sym"] = False
    if getattr(args, "keep", None):
        data["overrides"] = {**data.get("overrides", {}), **dict.fromkeys(args.keep, "float")}
    for item in getattr(args, "set", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DsQuantError(f"{item}: expected KEY=VALUE (e.g. overrides.lm_head=8)")
        head, _, rest = key.partition(".")
        if rest:
            data.setdefault(head, {})
            if not isinstance(data[head], dict):
                raise DsQuantError(f"{key}: {head} is not a mapping")
            data[head][rest] = _parse_value(value)
        else:
            data[key] = _parse_value(value)
    return QuantConfig.from_dict(data, where=args.config or "quantize")


def _providers(name: str) -> list[str] | None:
    from ds_quant.onnx import PROVIDERS

    return None if name == "auto" else [PROVIDERS[name]]


def _tokenizer(model_dir: Path, flag: str):
    from ds_models import load_tokenizer
    from ds_quant.errors import DsQuantError

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise DsQuantError(f"{flag}: {model_dir / 'tokenizer.json'}: missing (needed to tokenize the text)")
    return tok


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None)
    return bar, (lambda _name: bar.update(1))


# --- commands ---------------------------------------------------------------------------------


def _quantize(args) -> int:
    from ds_quant.calibration import read_texts, token_stream, windows
    from ds_quant.checkpoint import is_quantized_dir, load_model, save_quantized
    from ds_quant.errors import DsQuantError
    from ds_quant.quantize import quantize

    config = quant_config_from_args(args)
    model_dir = Path(args.model)
    if model_dir.is_dir() and is_quantized_dir(model_dir):
        raise DsQuantError(f"--model: {model_dir}: already quantized (has quant.yaml); pass the float model")
    if Path(args.out).exists() and not args.force:
        raise DsQuantError(f"--out: {args.out}: already exists (pass --force to replace it)")
    calib = None
    if config.method == "gptq":
        if config.calib is None:
            raise DsQuantError("--calib: required with --method gptq (a .txt/.jsonl file, or builtin)")
        tok = _tokenizer(model_dir, "--calib")
        stream = token_stream(read_texts(config.calib, flag="--calib"), tok)
        calib = windows(stream, config.gptq.seq_len, config.gptq.n_samples, seed=config.gptq.seed)
    model = load_model(model_dir)
    bar, tick = _progress(model.config.n_layers, "gptq") if calib is not None else (None, None)
    quantize(model, config=config, calibration=calib, progress=tick)
    if bar is not None:
        bar.close()
    tok_path = model_dir / "tokenizer.json"
    save_quantized(
        model, args.out, tokenizer=tok_path if tok_path.exists() else None, force=args.force,
        provenance={"parent": str(model_dir.resolve()), "command": _command()},
    )  # fmt: skip
    print(f"wrote {args.out} ({config.bits}-bit {config.method}, group {config.group_size})")
    return 0


def _export(args) -> int:
    from ds_quant.onnx_export import export_directory

    out = export_directory(
        args.model, args.out, bits=args.bits, group_size=args.group_size or 128, sym=not args.asym,
        force=args.force, accuracy_level=args.accuracy_level, command=_command(),
    )  # fmt: skip
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of ONNX)")
    return 0


def _generate(args) -> int:
    from ds_quant.errors import DsQuantError
    from ds_quant.onnx import OnnxModel

    model = OnnxModel(args.onnx, providers=_providers(args.provider))
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.ids:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise DsQuantError("--prompt: with --ids, expected space-separated token ids") from None
        print(" ".join(map(str, model.generate([ids], args.max_new_tokens, **kw)[0])))
        return 0
    print(args.prompt + model.generate_text(args.prompt, args.max_new_tokens, **kw))
    return 0


def _verify(args) -> int:
    from ds_quant.evaluate import verify

    r = verify(args.onnx, args.model, n_prompts=args.prompts, seq_len=args.seq_len, seed=args.seed,
               providers=_providers(args.provider))  # fmt: skip
    for c in r["checks"]:
        status = "ok" if c["passed"] else "FAILED"
        print(
            f"{status}: {c['name']} on {r['providers'][0]}: max relative logit error {c['full']:.2e} "
            f"(full forward), {c['cached']:.2e} (KV-cache decode), tolerance {c['tolerance']:.0e}; "
            f"argmax agreement {100 * c['argmax_agreement']:.1f}%"
        )
    return 0 if r["passed"] else 1


def _eval(args) -> int:
    import copy

    from rich.console import Console
    from rich.table import Table

    from ds_quant.calibration import read_texts, token_stream, windows
    from ds_quant.checkpoint import is_quantized_dir, load_model
    from ds_quant.errors import DsQuantError
    from ds_quant.evaluate import evaluate_onnx, evaluate_torch
    from ds_quant.quantize import QuantConfig, quantize

    model_dir = Path(args.model)
    if model_dir.is_dir() and is_quantized_dir(model_dir):
        raise DsQuantError(
            f"--model: {model_dir}: already quantized; eval compares quantizations of the float model"
        )
    for b in args.bits:
        if b not in (32, 8, 4):
            raise DsQuantError(f"--bits: unsupported bit width {b}; expected 32, 8 or 4")
    tok = _tokenizer(model_dir, "--text")
    base = load_model(model_dir)
    held_out = windows(token_stream(read_texts(args.text, flag="--text", default_split="validation"), tok),
                       args.seq_len, args.max_windows, flag="--text")  # fmt: skip
    calib = None
    results = []
    overrides = dict.fromkeys(args.keep, "float")
    for bits in args.bits:
        for method in ["float"] if bits == 32 else args.method:
            if bits == 32:
                results.append(evaluate_torch("float32", base, held_out))
                continue
            config = QuantConfig(bits=bits, group_size=args.group_size or 128, sym=not args.asym, method=method,
                                 overrides=overrides, calib=args.calib if method == "gptq" else None)  # fmt: skip
            if method == "gptq" and calib is None:
                g = config.gptq
                calib = windows(
                    token_stream(read_texts(args.calib), tok), g.seq_len, g.n_samples, seed=g.seed
                )
            model = quantize(copy.deepcopy(base), config=config, calibration=calib)
            results.append(evaluate_torch(f"int{bits} {method}", model, held_out))
    for d in args.onnx:
        results.append(evaluate_onnx(f"onnx {Path(d).name}", d, held_out))
    ref = results[0] if args.bits and args.bits[0] == 32 else None
    table = Table(title=f"{model_dir.name}: {held_out.numel()} held-out tokens ({args.text})")
    for col in ("model", "weights MB", "perplexity", "Δ ppl", "next-token acc", "acc / fp32"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in results:
        d_ppl = f"{100 * (r.perplexity / ref.perplexity - 1):+.2f}%" if ref else "-"
        ratio = f"{100 * r.accuracy / ref.accuracy:.2f}%" if ref and ref.accuracy else "-"
        size = f"{r.weight_bytes / 1e6:.2f}" if r.weight_bytes else "-"
        table.add_row(r.name, size, f"{r.perplexity:.3f}", d_ppl, f"{100 * r.accuracy:.2f}%", ratio)
    Console().print(table)
    if args.json:
        rows = [{"name": r.name, "perplexity": r.perplexity, "accuracy": r.accuracy, "tokens": r.tokens,
                 "weight_bytes": r.weight_bytes} for r in results]  # fmt: skip
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.json)
    return 0


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [PROG, *sys.argv[1:]])


COMMANDS = {"quantize": _quantize, "export": _export, "generate": _generate, "verify": _verify, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    from ds_models import ModelError
    from ds_quant.errors import DsQuantError

    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():  # scoped: main() is also called in-process (tests, other tools)
            return COMMANDS[args.command](args)
    except (DsQuantError, ModelError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
