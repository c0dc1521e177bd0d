"""Quantized model directories: the ds model directory plus ``quant.yaml``.

    config.yaml        ModelConfig (unchanged)
    quant.yaml         QuantConfig + the resolved precision of every layer + the packing format
                       + ``gathered_mlps``: {static-sparse MLP: kept width} (gathered_mlp.py)
    model.safetensors  packed weights in MatMulNBits layout: <layer>.qweight uint8 (N, n_blocks, blob),
                       <layer>.scales float32 (N, n_blocks), <layer>.zero_points uint8 (asymmetric
                       only), <layer>.bias; float tensors for everything kept in float
    tokenizer.json     copied from the source model, when it has one
    provenance.json    parent model, quantization command, package versions

The ONNX exporter copies these bytes into MatMulNBits / GatherBlockQuantized initializers, so a
quantized model is exported without re-quantizing. Everything is written into a temporary
directory beside the target and renamed into place at the end: an interrupted run leaves no
half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ds_models import ModelConfig, ModelError, Transformer, write_provenance
from ds_quant.errors import DsQuantError
from ds_quant.gathered_mlp import GatheredMLP, gathered_widths, is_static_sparse
from ds_quant.quant_linear import QuantEmbedding, QuantLinear
from ds_quant.quantize import FLOAT, QuantConfig, layer_precisions

QUANT_FILE = "quant.yaml"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PACKING_FORMAT = "onnxruntime.MatMulNBits"
FORMAT_VERSION = 1


@contextlib.contextmanager
def building(target: str | os.PathLike[str], *, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it becomes `target` (replacing it with force)."""
    target = Path(target)
    if target.exists() and not force:
        raise DsQuantError(f"{flag}: {target}: already exists (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # force: move the old one aside first, so a failure never loses both
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_quantized_dir(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / QUANT_FILE).exists()


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized directory stores: the state dict without tied duplicates."""
    sd = model.state_dict()
    if getattr(model.config, "tie_embeddings", False) and isinstance(model.lm_head, nn.Linear):
        sd.pop("lm_head.weight", None)  # float and tied: the same tensor as embed_tokens.weight
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    provenance: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a quantized model (from `ds_quant.quantize`) as a model directory with quant.yaml."""
    config: QuantConfig | None = getattr(model, "quant_config", None)
    if config is None:
        raise DsQuantError("model: not quantized (no quant_config); run ds_quant.quantize first")
    directory = Path(directory)
    with building(directory, force=force) as tmp:
        model.config.to_yaml(tmp / CONFIG_FILE)
        quant = {
            "format": PACKING_FORMAT,
            "format_version": FORMAT_VERSION,
            **config.to_dict(),
            "tied_embeddings": bool(model.config.tie_embeddings),
            "layers": layer_precisions(model),
            "gathered_mlps": gathered_widths(model),
        }
        (tmp / QUANT_FILE).write_text(yaml.safe_dump(quant, sort_keys=False), encoding="utf-8")
        save_file(
            quant_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "ds_quant": PACKING_FORMAT}
        )
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        write_provenance(tmp, **(provenance or {}), quantization=config.to_dict())
    return directory


def read_quant_yaml(directory: str | os.PathLike[str]) -> tuple[QuantConfig, dict[str, Any]]:
    """(QuantConfig, the whole quant.yaml mapping) of a quantized directory."""
    path = Path(directory) / QUANT_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsQuantError(f"{path}: missing (not a quantized model directory)") from None
    except yaml.YAMLError:
        raise DsQuantError(f"{path}: invalid YAML") from None
    if not isinstance(data, dict):
        raise DsQuantError(f"{path}: expected a mapping")
    if data.get("format") != PACKING_FORMAT:
        raise DsQuantError(f"{path}: format: expected {PACKING_FORMAT!r}, got {data.get('format')!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise DsQuantError(
            f"{path}: format_version: expected {FORMAT_VERSION}, got {data.get('format_version')!r}"
        )
    if not isinstance(data.get("layers"), dict):
        raise DsQuantError(f"{path}: layers: expected a mapping of module name: bits")
    gathered = data.setdefault("gathered_mlps", {})  # absent in directories without static sparsity
    if not isinstance(gathered, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in gathered.values()
    ):
        raise DsQuantError(f"{path}: gathered_mlps: expected a mapping of MLP module name: kept width (> 0)")
    extra = ("format", "format_version", "tied_embeddings", "layers", "gathered_mlps")
    fields = {k: v for k, v in data.items() if k not in extra}
    return QuantConfig.from_dict(fields, where=str(path)), data


def load_quantized(
    directory: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> Transformer:
    """Rebuild a quantized Transformer (QuantLinear swapped in) from a directory with quant.yaml."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DsQuantError(f"--model: {directory}: no such model directory")
    for name in (CONFIG_FILE, QUANT_FILE, WEIGHTS_FILE):
        if not (directory / name).exists():
            raise DsQuantError(f"{directory / name}: missing (a quantized model directory has {CONFIG_FILE}, "
                               f"{QUANT_FILE} and {WEIGHTS_FILE})")  # fmt: skip
    try:
        mconfig = ModelConfig.from_yaml(directory / CONFIG_FILE)
    except ModelError as e:
        raise DsQuantError(str(e)) from None
    qconfig, data = read_quant_yaml(directory)
    where = directory / QUANT_FILE
    layers: dict[str, Any] = data["layers"]
    with torch.device("meta"):  # no random init, no memory: every tensor comes from the file
        model = Transformer(mconfig)
    for name, width in data["gathered_mlps"].items():
        try:
            mlp = model.get_submodule(name)
        except AttributeError:
            mlp = None
        if mlp is None or not is_static_sparse(mlp):
            raise DsQuantError(
                f"{where}: gathered_mlps: {name}: not a static-sparse MLP of this {CONFIG_FILE}"
            )
        if width > mlp.d_ff:
            raise DsQuantError(f"{where}: gathered_mlps: {name}: {width} kept neurons > d_ff {mlp.d_ff}")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, GatheredMLP(
            mconfig.d_model, width, bias=mlp.gate_proj.bias is not None, device="meta"))  # fmt: skip
    known = set(layer_precisions(model))
    for name in layers:
        if name not in known:
            raise DsQuantError(f"{where}: layers: {name}: not a module of this {CONFIG_FILE}")
    for name, bits in layers.items():
        if bits == FLOAT or name == "embed_tokens":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(old.in_features, old.out_features, bits=int(bits),
                                          block_size=qconfig.group_size, sym=qconfig.sym,
                                          bias=old.bias is not None, device="meta"))  # fmt: skip
    emb_bits = layers.get("embed_tokens", FLOAT)
    if emb_bits != FLOAT:
        tied = bool(data.get("tied_embeddings")) and isinstance(model.lm_head, QuantLinear)
        model.embed_tokens = QuantEmbedding(
            mconfig.vocab_size, mconfig.d_model, bits=int(emb_bits), block_size=qconfig.group_size,
            sym=qconfig.sym, tied_to=model.lm_head if tied else None, device="meta",
        )  # fmt: skip
    model = model.to_empty(device=device or "cpu")
    if mconfig.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties shared parameters
    path = directory / WEIGHTS_FILE
    try:
        state = load_file(str(path), device=str(device or "cpu"))
    except (SafetensorError, OSError) as e:
        raise DsQuantError(f"{path}: corrupt or not a safetensors file ({e})") from None
    expected = quant_state_keys(model)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise DsQuantError(f"{path}: {unexpected[0]}: unexpected tensor (not in this {QUANT_FILE}'s model)")
    if missing:
        raise DsQuantError(f"{path}: {missing[0]}: missing ({len(missing)} tensors missing)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise DsQuantError(
            f"{path}: does not match {CONFIG_FILE} / {QUANT_FILE}: {str(e).splitlines()[-1].strip()}"
        ) from None
    model.quant_config = qconfig  # type: ignore[assignment]
    return model.eval()


def quant_state_keys(model: nn.Module) -> set[str]:
    keys = set(model.state_dict())
    if getattr(model.config, "tie_embeddings", False) and isinstance(model.lm_head, nn.Linear):
        keys.discard("lm_head.weight")
    return keys


def load_model(directory: str | os.PathLike[str], *, flag: str = "--model") -> Transformer:
    """A float or quantized model directory, with DsQuantError for everything that is wrong with it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DsQuantError(f"{flag}: {directory}: no such model directory")
    if is_quantized_dir(directory):
        return load_quantized(directory)
    if not (directory / CONFIG_FILE).exists():
        raise DsQuantError(f"{directory / CONFIG_FILE}: missing (not a ds model directory)")
    try:
        return Transformer.from_pretrained(directory, dtype=torch.float32)
    except ModelError as e:
        raise DsQuantError(str(e)) from None
