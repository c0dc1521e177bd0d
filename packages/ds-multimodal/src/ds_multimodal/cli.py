"""`ds-multimodal`: train the aligner on the built-in dataset and evaluate it.

    ds-multimodal train --out runs/mm [--config mm.yaml] [key=value ...]   # trains, saves, prints the table
    ds-multimodal eval --model runs/mm [--json results.json]

Exit codes: 0 ok, 1 failed, 2 bad input (one line on stderr naming the file, field or flag).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from ds_multimodal.errors import DsMultimodalError

PROG = "ds-multimodal"


def parse_overrides(items: list[str]) -> dict:
    """key=value (values parsed as YAML scalars; encoder.x=... sets a field of the encoder config)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise DsMultimodalError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if key.startswith("encoder."):
            out.setdefault("encoder", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def _train_config(config_path: str | None, overrides: list[str]):
    import dataclasses

    from ds_multimodal.train import TrainConfig

    data: dict = {}
    if config_path:
        p = Path(config_path)
        if not p.is_file():
            raise DsMultimodalError(f"{p}: file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise DsMultimodalError(f"{p}: invalid YAML") from None
        if not isinstance(data, dict):
            raise DsMultimodalError(f"{p}: expected a mapping of field: value")
    over = parse_overrides(overrides)
    enc = {**data.get("encoder", {}), **over.pop("encoder", {})}
    data = {**data, **over}
    if enc:
        data["encoder"] = enc
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in known:
            raise DsMultimodalError(
                f"{config_path or 'overrides'}: {key}: unknown field; expected one of {sorted(known)}"
            )
    try:
        return TrainConfig(**data)
    except TypeError as e:
        raise DsMultimodalError(f"{config_path or 'overrides'}: {e}") from None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)


def cmd_train(args) -> int:
    from ds_multimodal.data import load_digits_multimodal
    from ds_multimodal.retrieval import evaluate, format_table
    from ds_multimodal.train import train

    cfg = _train_config(args.config, args.overrides)
    model, history = train(cfg, progress=not args.quiet, log=lambda s: print(s, file=sys.stderr))
    model.save_pretrained(
        args.out,
        provenance={"data": "built-in digits (sklearn load_digits, espeak-ng)", "train_config": cfg.to_dict(),
                    "command": "ds-multimodal train " + " ".join(sys.argv[2:])},
    )  # fmt: skip
    print(
        f"saved {args.out} ({history['train_seconds']:.0f} s training, final loss {history['loss'][-1]:.3f})"
    )
    if not args.no_eval:
        test = load_digits_multimodal(
            "test", seed=cfg.seed, audio=model.audio is not None, cache_dir=cfg.cache_dir or None
        )
        results = evaluate(model, test)
        _write_json(Path(args.out) / "eval.json", results)
        print(format_table(results))
    return 0


def cmd_eval(args) -> int:
    from ds_multimodal.data import load_digits_multimodal
    from ds_multimodal.model import MultimodalAligner
    from ds_multimodal.retrieval import evaluate, format_table

    model = MultimodalAligner.from_pretrained(args.model)
    data = load_digits_multimodal(args.split, seed=args.seed, audio=model.audio is not None)
    results = evaluate(model, data)
    print(format_table(results))
    if args.json:
        _write_json(Path(args.json), results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the built-in dataset, save, evaluate", formatter_class=fmt)
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--config", help="YAML file of TrainConfig fields")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "overrides", nargs="*", help="TrainConfig key=value overrides, e.g. epochs=5 encoder.hidden_dim=32"
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="Recall@1/5 per modality pair and zero-shot table", formatter_class=fmt)
    e.add_argument("--model", required=True, help="model directory written by `train`")
    e.add_argument("--split", default="test", choices=["train", "calibration", "test"])
    e.add_argument("--seed", type=int, default=0, help="dataset split seed (use the training seed)")
    e.add_argument("--json", help="also write the results as JSON here")
    e.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DsMultimodalError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
