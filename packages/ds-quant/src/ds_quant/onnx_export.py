"""Export a ds model (float or quantized) to an ONNX decoder with KV-cache inputs and outputs.

How: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, predictable for
this graph) traces `OnnxDecoder`, a wrapper that re-runs the ds_models.Transformer forward with
explicit past/present tensors instead of the preallocated KVCache. Every piece of the model is
called as a module (norms, q/k/v/o projections, the ds_core SparseMLP), so the graph computes
exactly what PyTorch computes; only the attention wiring is re-stated here.

Quantized layers export through their own symbolics (quant_linear.py): QuantLinear becomes
``com.microsoft::MatMulNBits`` and QuantEmbedding ``com.microsoft::GatherBlockQuantized`` over
the stored packed bytes (a tied lm_head and embedding share one initializer). Float linears
become ``Gemm(transB=1)`` on the (out, in) weight, so no transposed copy is stored.
Constant folding is off for the same reason: it would materialise a reshaped copy of a shared
table. onnxruntime folds what is left at session start.

Sparse ds-core layers:

- MLP at ``sparse_ratio`` 0: the dense SwiGLU.
- MLP, ``static`` mode: the gathered (smaller) dense MLP of the kept neurons. Float weights are
  gathered here; quantized models were gathered before quantization (gathered_mlp.py), so their
  MatMulNBits weights hold only the kept rows too. (A quantized SparseMLP that still holds every
  row, as ds-quant wrote before gathering, exports as the full projections times the 0/1 mask.)
- MLP, ``dynamic`` mode: the calibrated threshold mask (``|x| > t``) followed by the dense matmul:
  the same numbers as PyTorch, without the skipped reads (onnxruntime has no row-gather kernel).
  An uncalibrated dynamic MLP (per-token top-k) is refused: calibrate it first.
- Attention: always dense. ds-core sparse attention equals dense attention while the context
  fits in its sink + local blocks; beyond that the ONNX model attends to every key.

Graph inputs: ``input_ids`` (B, T) int64, ``attention_mask`` (B, P + T) int64 (1 = token, 0 = left
padding), ``position_ids`` (B, T) int64, ``past_key_values.{i}.key|value`` (B, K, P, D) float32.
Outputs: ``logits`` (B, T, vocab) float32, ``present.{i}.key|value`` (B, K, P + T, D).
B, T and P are dynamic (P may be 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from ds_models import apply_rope, rope_cos_sin
from ds_quant.errors import DsQuantError
from ds_quant.quant_linear import QuantEmbedding, QuantLinear
from ds_quant.quantize import refuse_sparse_projections

OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = (
    1 << 30
)  # bytes of weights above which tensors go to model.onnx.data (< the 2 GB protobuf cap)
ACCURACY_LEVELS = (0, 4)


class _GemmLinear(nn.Module):
    """A float linear that exports as Gemm(x2d, W, transB=1): no transposed copy of W is stored.

    The weight may be stored in float16 (``--bits 16``) and is then cast to float32 in the graph.
    """

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.stored = weight  # (out, in), float32 or float16
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight (callers such as SparseMLP check its dtype against the input's)."""
        return self.stored.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], -1)


class _FloatEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class OnnxDecoder(nn.Module):
    """ds_models.Transformer.forward with explicit past / present tensors: what the graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        c = model.config
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = (
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
        )
        self.rope_theta = c.rope_theta

    def forward(self, input_ids, attention_mask, position_ids, *past):
        m = self.model
        T = input_ids.shape[1]
        S = attention_mask.shape[1]  # P + T key slots
        # Query i sits at slot S - T + i and may attend to slots <= its own that hold a token.
        q_slot = torch.arange(T, device=input_ids.device) + (S - T)  # (T,)
        k_slot = torch.arange(S, device=input_ids.device)  # (S,)
        allowed = (k_slot[None, :] <= q_slot[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        # A finite minimum instead of -inf: a fully padded query row softmaxes to uniform, not NaN.
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # (B, 1, T, S)

        x = m.embed_tokens(input_ids)  # (B, T, d_model)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)  # (B, 1, T, D)
        presents = []
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
            k = attn.k_proj(h).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, K, T, D)
            v = attn.v_proj(h).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, K, S, D)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            y = _gqa_attention(q, k, v, bias)  # (B, H, T, D)
            x = x + attn.o_proj(y.transpose(1, 2).flatten(2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = m.lm_head(m.norm(x)).float()  # (B, T, vocab)
        return (logits, *presents)


def _gqa_attention(q, k, v, bias):
    """Softmax attention; the G = H / K query heads of a kv head share it without copying the cache."""
    H, D = q.shape[1], q.shape[3]
    K = k.shape[1]
    q = q.unflatten(1, (K, H // K))  # (B, K, G, T, D): head h uses kv head h // G, as in HF
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * D**-0.5  # (B, K, G, T, S)
    probs = torch.softmax(scores + bias.unsqueeze(1), dim=-1)
    return torch.matmul(probs, v.unsqueeze(2)).flatten(1, 2)  # (B, H, T, D)


class _StaticSparseMLP(nn.Module):
    """A static-mode ds-core SparseMLP as the graph computes it: only the kept neurons exist.

    Float projections become the gathered dense weights of the kept neurons (a smaller MLP);
    quantized ones keep their packed rows and multiply the hidden activations by the 0/1 mask.
    The kept set is ds_core's ``static_keep`` of ``neuron_score``, so the graph equals PyTorch.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        d_ff = mlp.neuron_score.shape[0]
        keep = mlp.static_keep_indices()  # ds-core's own rule, so the graph computes what PyTorch does
        self.gathered = all(type(p) is nn.Linear for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if self.gathered:
            g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            w_gu = torch.cat([g.weight[keep], u.weight[keep]])  # (2k, d_model): one GEMM for gate and up
            b_gu = None if g.bias is None else torch.cat([g.bias[keep], u.bias[keep]])
            self.gate_up = _GemmLinear(nn.Parameter(w_gu.detach(), requires_grad=False), b_gu)
            self.down = _GemmLinear(
                nn.Parameter(d.weight[:, keep].detach().contiguous(), requires_grad=False), d.bias
            )
        else:
            self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            self.register_buffer("mask", torch.zeros(d_ff).index_fill_(0, keep, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gathered:
            g, u = self.gate_up(x).chunk(2, dim=-1)  # (..., k) each
            return self.down(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x) * self.mask)


# --- preparing the model ----------------------------------------------------------------------


def prepare_for_export(model: nn.Module, weight_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap float linears / embeddings for their export forms (in place); weights optionally float16.

    Static sparse MLPs become `_StaticSparseMLP`; linears of a dynamic sparse MLP stay
    nn.Linear (its masked-dense path is what exports).
    """
    for name, mod in list(model.named_modules()):
        sparsity = getattr(mod, "sparsity", None)
        if getattr(sparsity, "sparse_ratio", 0.0) <= 0 or not hasattr(mod, "gate_proj"):
            continue
        if sparsity.mode == "static":
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _StaticSparseMLP(mod))
        elif not getattr(mod, "calibrated", True):
            raise DsQuantError(
                f"{name}: dynamic sparsity is not calibrated (per-token top-k has no ONNX export); "
                "calibrate it first: with ds_core.calibration(model): model(batch)"
            )
    cast: dict[int, nn.Parameter] = {}  # one (possibly float16) Parameter per original, so ties survive

    def param(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in cast:
            cast[id(p)] = nn.Parameter(p.detach().to(weight_dtype), requires_grad=False)
        return cast[id(p)]

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear:
                if getattr(getattr(mod, "sparsity", None), "sparse_ratio", 0.0) > 0:
                    if weight_dtype != torch.float32:
                        raise DsQuantError(
                            f"--bits 16: {full}: dynamic sparse MLP weights export in float32 only"
                        )
                    continue
                setattr(mod, child_name, _GemmLinear(param(child.weight), child.bias))
            elif type(child) is nn.Embedding:
                setattr(mod, child_name, _FloatEmbedding(param(child.weight)))
    return model


def _check_exportable(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.bits not in (4, 8):  # pragma: no cover
            raise DsQuantError(f"{name}: {m.bits}-bit weights have no MatMulNBits export")
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float16):
            raise DsQuantError(f"{name}: export needs float32 CPU weights, got {p.dtype} on {p.device}")


# --- export -----------------------------------------------------------------------------------


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    weight_dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    external_data: bool | None = None,
    accuracy_level: int = 4,
) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.data`` when large) for `model` into an existing directory.

    `model` is a ds_models.Transformer, float or quantized (ds_quant.quantize); it is modified in
    place (export forms of its float layers). metadata: extra ``metadata_props`` key/values.
    external_data: None = only when the weights exceed 1 GiB. accuracy_level: MatMulNBits' attribute
    (0 float activations, 4 int8 activations on CPU: faster; see quant_linear.py).
    """
    if accuracy_level not in ACCURACY_LEVELS:
        raise DsQuantError(f"--accuracy-level: expected one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    refuse_sparse_projections(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.accuracy_level = accuracy_level
    directory = Path(directory)
    model = prepare_for_export(model.eval(), weight_dtype)
    _check_exportable(model)
    c = model.config
    decoder = OnnxDecoder(model).eval()
    B, T, P = 2, 3, 4  # > 1 each, so that no size is mistaken for a constant
    args = (
        torch.randint(0, c.vocab_size, (B, T)),
        torch.ones(B, P + T, dtype=torch.long),
        torch.arange(P, P + T).expand(B, T).contiguous(),
        *[torch.zeros(B, c.n_kv_heads, P, c.head_dim) for _ in range(2 * c.n_layers)],
    )
    inputs, outputs = io_names(c.n_layers)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    quantized = any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    big = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    staging = directory / ".export"
    staging.mkdir()
    raw = staging / MODEL_FILE
    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        _torchscript_export(
            decoder, args, str(raw), opset_version=OPSET, input_names=inputs, output_names=outputs,
            dynamic_axes=axes, do_constant_folding=False,
            custom_opsets={"com.microsoft": 1} if quantized else None,
        )  # fmt: skip
    proto = onnx.load(str(raw), load_external_data=False)
    _fix_quant_outputs(proto)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    _write(proto, staging, directory, big)
    for p in staging.iterdir():
        p.unlink()
    staging.rmdir()
    return directory / MODEL_FILE


def _torchscript_export(model: nn.Module, args: tuple, path: str, **kwargs: Any) -> None:
    """torch.onnx.export(dynamo=False) without the exporter's ONNX shape-inference passes.

    Those passes serialise every weight into a temporary ModelProto (25 s per GB here, and a second
    copy of the model in memory); the traced graph already carries the types the symbolics need,
    and onnxruntime infers shapes itself. Falls back to the public call if the private entry
    point moves.
    """
    try:
        from torch.onnx._internal.torchscript_exporter.utils import _export
    except ImportError:  # pragma: no cover - a torch that reorganised its exporter
        torch.onnx.export(model, args, path, dynamo=False, **kwargs)
        return
    _export(model, args, path, onnx_shape_inference=False, **kwargs)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ logging of the exporter ("shape inference of com.microsoft::MatMulNBits is
    missing" once per node: expected, onnxruntime infers those shapes). Errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fix_quant_outputs(proto: onnx.ModelProto) -> None:
    """Drop stale value_info for contrib-op outputs (the tracer guesses their type): ORT infers them."""
    produced = {o for n in proto.graph.node if n.domain == "com.microsoft" for o in n.output}
    keep = [vi for vi in proto.graph.value_info if vi.name not in produced]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)


def _write(proto: onnx.ModelProto, staging: Path, directory: Path, big: bool) -> None:
    """Save model.onnx; with `big`, every initializer over 1 KiB goes into one model.onnx.data.

    The exporter may have spilled each tensor into its own file in `staging`; they are streamed into
    the single data file one at a time, so a 7 GB model never sits in memory twice.
    """
    if not big:
        onnx.load_external_data_for_model(proto, str(staging))
        onnx.save_model(proto, str(directory / MODEL_FILE))
        return
    with open(directory / DATA_FILE, "wb") as f:
        for t in proto.graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                with open(staging / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    data = src.read(info.length) if info.length else src.read()
            else:
                data = t.raw_data
                if len(data) <= 1024:
                    continue
            pad = -f.tell() % 4096  # page-aligned offsets let onnxruntime mmap the tensors
            f.write(b"\0" * pad)
            offset = f.tell()
            f.write(data)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
    onnx.save_model(proto, str(directory / MODEL_FILE))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ds metadata of an exported model.onnx: {key: parsed JSON or string}."""
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


# --- model directory -> ONNX directory --------------------------------------------------------

EXPORT_BITS = (4, 8, 16, 32)


def export_directory(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bits: int | None = None,
    group_size: int = 128,
    sym: bool = True,
    force: bool = False,
    accuracy_level: int = 4,
    command: str | None = None,
    progress=None,
) -> Path:
    """``ds-quant export --onnx``: a (float or quantized) model directory -> an ONNX directory.

    The output holds model.onnx (+ model.onnx.data), config.yaml, quant.yaml (quantized),
    tokenizer.json (when the source has one) and provenance.json; model.onnx carries the same
    config / quantization / tokenizer / provenance in its metadata_props. bits None keeps a
    quantized model's stored bits and exports a float model in float32; 4 or 8 on a float model
    quantizes it with round-to-nearest first (run ``ds-quant quantize`` for GPTQ). accuracy_level
    goes to every MatMulNBits node (4: int8 activations on CPU, the fast default; 0: float).
    """
    import yaml

    from ds_models import write_provenance
    from ds_quant.__about__ import __version__
    from ds_quant.checkpoint import (
        CONFIG_FILE,
        QUANT_FILE,
        TOKENIZER_FILE,
        building,
        is_quantized_dir,
        load_model,
        read_quant_yaml,
    )
    from ds_quant.gathered_mlp import gathered_widths
    from ds_quant.quantize import QuantConfig, layer_precisions, quantize

    model_dir = Path(model_dir)
    if bits is not None and bits not in EXPORT_BITS:
        raise DsQuantError(f"--bits: unsupported bit width {bits!r}; expected one of {EXPORT_BITS}")
    if Path(out_dir).exists() and not force:
        raise DsQuantError(f"--out: {out_dir}: already exists (pass --force to replace it)")
    quant: dict[str, Any] | None = None
    if model_dir.is_dir() and is_quantized_dir(model_dir):
        qconfig, quant = read_quant_yaml(model_dir)
        if bits is not None and bits != qconfig.bits:
            raise DsQuantError(
                f"--model: {model_dir}: already quantized to {qconfig.bits} bits; export it without --bits "
                f"(or --bits {qconfig.bits}), or start from the float model for --bits {bits}"
            )
        bits = qconfig.bits
    model = load_model(model_dir)
    if bits is None:
        bits = 32
    if quant is None and bits in (4, 8):
        qconfig = QuantConfig(bits=bits, group_size=group_size, sym=sym)
        quantize(model, config=qconfig)
        quant = {
            **qconfig.to_dict(),
            "layers": layer_precisions(model),
            "gathered_mlps": gathered_widths(model),
        }
    source_prov = {}
    if (model_dir / "provenance.json").exists():
        source_prov = json.loads((model_dir / "provenance.json").read_text(encoding="utf-8"))
    export_info = {
        "bits": bits,
        "weights": {4: "int4 MatMulNBits", 8: "int8 MatMulNBits", 16: "float16", 32: "float32"}[bits],
        "source": str(model_dir.resolve()),
        "accuracy_level": accuracy_level if bits in (4, 8) else 0,
        "opset": OPSET,
        "ds_quant": __version__,
        "attention": "dense (ds-core sparse attention exports as dense attention)",
    }
    metadata = {
        "ds.config": json.dumps(model.config.to_dict()),
        "ds.quant": json.dumps(quant),
        "ds.export": json.dumps(export_info),
        "ds.provenance": json.dumps({**source_prov, "export": {**export_info, "command": command}}),
    }
    tok = model_dir / TOKENIZER_FILE
    if tok.exists():
        tok_text = tok.read_text(encoding="utf-8")
        try:  # compact JSON: tokenizers pretty-prints its merges, over half of the bytes (7% of an int4 ds-small)
            metadata["ds.tokenizer"] = json.dumps(
                json.loads(tok_text), separators=(",", ":"), ensure_ascii=False
            )
        except json.JSONDecodeError:
            raise DsQuantError(f"{tok}: not valid JSON (expected a tokenizers tokenizer.json)") from None
    with building(out_dir, force=force) as tmp:
        if progress:
            progress("exporting")
        export_onnx(model, tmp, weight_dtype=torch.float16 if bits == 16 else torch.float32, metadata=metadata,
                    accuracy_level=accuracy_level)  # fmt: skip
        model.config.to_yaml(tmp / CONFIG_FILE)
        if quant is not None:
            (tmp / QUANT_FILE).write_text(yaml.safe_dump(quant, sort_keys=False), encoding="utf-8")
        if tok.exists():
            (tmp / TOKENIZER_FILE).write_text(tok_text, encoding="utf-8")
        if source_prov:
            (tmp / "provenance.json").write_text(json.dumps(source_prov, indent=2), encoding="utf-8")
        write_provenance(tmp, parent=str(model_dir.resolve()), export=export_info, command=command)
    return Path(out_dir)
