"""``ds-quant verify`` (onnxruntime vs PyTorch logits) and ``ds-quant eval`` (perplexity, accuracy).

verify rebuilds the PyTorch twin of an exported model — the float model for ``--bits 32``, its
weights rounded to float16 for ``--bits 16``, the quantized model (loaded from its quant.yaml
directory, or re-quantized with the recorded round-to-nearest config) for 4 and 8 bits — and
compares logits on random prompts twice: a full forward without cache, and a prefill of half the
prompt followed by token-by-token decoding through the KV-cache inputs/outputs. The error is
max |onnx - torch| / max |torch| per prompt; the tolerance is 1e-4 for float exports and 1e-3
for quantized ones (the same packed weights, so only kernel accumulation order differs). An export
at MatMulNBits accuracy_level 4 is compared with a twin that quantizes its activations the same way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ds_quant.checkpoint import is_quantized_dir, load_model
from ds_quant.errors import DsQuantError
from ds_quant.onnx import OnnxModel
from ds_quant.onnx_export import DATA_FILE, MODEL_FILE
from ds_quant.quant_linear import QuantLinear, set_backend
from ds_quant.quantize import QuantConfig, quantize

TOLERANCE = {32: 1e-4, 16: 1e-4, 8: 1e-3, 4: 1e-3}
SHIPPED_TOLERANCE = 5e-2  # accuracy_level 4 vs its emulating twin (see verify)


def twin(onnx_model: OnnxModel, model_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The PyTorch model an exported ONNX model must reproduce."""
    info = onnx_model.metadata.get("ds.export") or {}
    source = Path(model_dir or info.get("source", ""))
    if not str(source) or not source.is_dir():
        raise DsQuantError(f"--model: {source}: no such model directory (the export's source; pass --model)")
    bits = int(info.get("bits", 32))
    model = load_model(source)
    if bits in (4, 8) and not is_quantized_dir(source):
        quant = dict(onnx_model.metadata.get("ds.quant") or {})
        quant.pop("layers", None)
        quant.pop("gathered_mlps", None)  # quantize gathers static-sparse MLPs again itself
        quantize(model, config=QuantConfig.from_dict(quant, where="ds.quant"))
    if bits == 16:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.copy_(m.weight.half().float())
    if model.config.to_dict() != onnx_model.config.to_dict():
        raise DsQuantError(f"--model: {source}: config.yaml differs from the exported model's ds.config")
    return model.eval()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@contextlib.contextmanager
def _float_activation_copy(om: OnnxModel, providers: list[str] | None) -> Iterator[OnnxModel]:
    """The same exported graph with accuracy_level 0 on every MatMulNBits (a temporary copy)."""
    proto = onnx.load(str(om.path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep)
    with tempfile.TemporaryDirectory(prefix="ds-quant-verify-") as tmp:
        data = om.path.parent / DATA_FILE
        if data.exists():
            os.symlink(data.resolve(), Path(tmp) / DATA_FILE)
        else:
            onnx.load_external_data_for_model(proto, str(om.path.parent))
        onnx.save_model(proto, str(Path(tmp) / MODEL_FILE))
        yield OnnxModel(tmp, providers=providers)


def _compare(om: OnnxModel, model: nn.Module, ids: torch.Tensor, level: int) -> tuple[float, float, float]:
    """(max rel error of the full forward, of prefill + KV-cache decode, argmax agreement)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.accuracy_level = level
    with set_backend("reference"):  # the exact definition of the quantized layers
        ref = model(ids).numpy()  # (n, T, vocab)
    n, seq_len = ids.shape
    full_logits = np.concatenate([om.logits(ids[i : i + 1].numpy()) for i in range(n)])
    # Prefill half, then decode the rest one token at a time through past/present.
    half = seq_len // 2
    x = ids.numpy()
    positions = np.broadcast_to(np.arange(seq_len), x.shape)
    logits, past = om.forward(
        x[:, :half], np.ones((n, half), np.int64), positions[:, :half], om.empty_past(n)
    )
    steps = [logits]
    for t in range(half, seq_len):
        logits, past = om.forward(
            x[:, t : t + 1], np.ones((n, t + 1), np.int64), positions[:, t : t + 1], past
        )
        steps.append(logits)
    cached_logits = np.concatenate(steps, axis=1)
    full = max(_rel(full_logits[i], ref[i]) for i in range(n))
    cached = max(_rel(cached_logits[i], ref[i]) for i in range(n))
    agree = float((full_logits.argmax(-1) == ref.argmax(-1)).mean())
    return full, cached, agree


@torch.no_grad()
def verify(
    onnx_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None = None,
    *,
    n_prompts: int = 4,
    seq_len: int = 16,
    seed: int = 0,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Compare onnxruntime and PyTorch logits on random prompts.

    Returns {"bits", "checks": [{"name", "full", "cached", "argmax_agreement", "tolerance", "passed"}],
    "passed", "providers"}. A quantized export at accuracy_level 4 on CPU gets two checks: the graph
    with float activations against the exact twin (tolerance 1e-3), and the graph as shipped (int8
    activations) against the twin that quantizes activations the same way. Rounding an activation
    that sits on an int8 boundary differently (1e-7 apart) moves it by a whole step, so the second
    check has the looser bound SHIPPED_TOLERANCE: it catches a wrong graph, not rounding flips.
    """
    om = OnnxModel(onnx_dir, providers=providers)
    model = twin(om, model_dir)
    info = om.metadata.get("ds.export") or {}
    bits = int(info.get("bits", 32))
    level = int(info.get("accuracy_level", 0)) if om.providers[0] == "CPUExecutionProvider" else 0
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, om.config.vocab_size, (n_prompts, seq_len), generator=gen)
    checks = []

    def check(name: str, session: OnnxModel, lvl: int, tol: float) -> None:
        full, cached, agree = _compare(session, model, ids, lvl)
        checks.append({"name": name, "full": full, "cached": cached, "argmax_agreement": agree,
                       "tolerance": tol, "passed": max(full, cached) <= tol})  # fmt: skip

    if level == 0:
        check(f"{bits}-bit export", om, 0, TOLERANCE[bits])
    else:
        with _float_activation_copy(om, providers) as exact:
            check(f"{bits}-bit graph, float activations", exact, 0, TOLERANCE[bits])
        check(
            f"{bits}-bit as shipped, int8 activations (accuracy_level {level})", om, level, SHIPPED_TOLERANCE
        )
    return {
        "bits": bits,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "providers": om.providers,
    }


# --- eval -------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    name: str
    nll: float  # mean next-token negative log-likelihood (nats)
    accuracy: float  # fraction of next tokens that are the argmax
    tokens: int
    weight_bytes: int | None = None

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


@torch.no_grad()
def evaluate_logits(
    name: str, logits_fn, windows: torch.Tensor, batch_size: int = 8, weight_bytes=None
) -> EvalResult:
    """Perplexity and next-token accuracy of logits_fn((B, T) ids) -> (B, T, vocab) over windows (n, T)."""
    nll, correct, count = 0.0, 0, 0
    for batch in windows.split(batch_size):
        logits = torch.as_tensor(logits_fn(batch))[:, :-1].float()  # (B, T-1, vocab)
        target = batch[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return EvalResult(name, nll / count, correct / count, count, weight_bytes)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored tensors (tied tensors once): what a model directory holds.

    The state dict, not every buffer: QuantLinear's prepared int4pack copies are never saved.
    """
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def evaluate_torch(name: str, model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> EvalResult:
    model = model.eval()
    with set_backend("cached"):
        return evaluate_logits(name, model, windows, batch_size, model_weight_bytes(model))


def evaluate_onnx(
    name: str, directory: str | os.PathLike[str], windows: torch.Tensor, batch_size: int = 8
) -> EvalResult:
    om = OnnxModel(directory)
    size = sum(p.stat().st_size for p in Path(om.path).parent.glob("model.onnx*"))
    return evaluate_logits(name, lambda b: om.logits(b.numpy()), windows, batch_size, size)
