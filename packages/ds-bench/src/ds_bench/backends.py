"""The systems under test behind one small interface, so that every comparison runs in one process.

  torch        ds-models in PyTorch, eager decode (ds_models.generate, mode "eager")
  torch-fast   ds-models' fast path: ds_models.generate's "auto" mode (torch.compile with CUDA graphs,
               or a captured CUDA graph for sparse models, on GPU; eager on CPU)
  onnx         ds-quant's ONNX export run by onnxruntime (ds_quant.onnx's runtime)
  hf           Hugging Face transformers on the same weights: the ds directory is converted in memory
               to a LlamaForCausalLM / Qwen2ForCausalLM (ds_models.hf_import's name and config mapping)
               and decoded with `model.generate`, the baseline users know

A backend loads a ds model directory, generates greedily for a batch of equal-length prompts while
reporting each step's tokens with the time they became available on the host, and returns logits
for scoring. Generation always runs the full `max_new_tokens` (no stop tokens), so every backend
does the same work.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ds_bench.errors import BenchError

# on_step(step, tokens, t): step 0 is the first token (after prefill); tokens has one id per prompt;
# t is time.perf_counter() when they were available on the host.
OnStep = Callable[[int, list[int], float], None]

DTYPES = ("fp32", "bf16", "fp16")


def now() -> float:
    return time.perf_counter()


@dataclass
class ModelFacts:
    """What the metrics need to know about the loaded model (for FLOPs and bytes per token)."""

    params: int
    matmul_params: int  # weights multiplied per token: projections and lm_head, not the lookup
    matmul_weight_bytes: int  # bytes a decode step reads for them, as stored (packed when quantized)
    n_layers: int
    d_attn: int  # n_heads * head_dim
    kv_bytes_per_token: int  # K and V over all layers, in the cache dtype
    vocab_size: int
    dtype: str
    quant: str | None = None

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        # 2 FLOPs per weight per token, plus causal attention: QK^T and AV over T^2/2 pairs each.
        return batch * (
            2.0 * self.matmul_params * prompt_len + 2.0 * self.n_layers * self.d_attn * prompt_len**2
        )

    def decode_bytes(self, batch: int, context: int) -> float:
        # Every weight once per step (shared by the batch) plus each row's KV cache so far.
        return self.matmul_weight_bytes + batch * context * self.kv_bytes_per_token


class Backend(ABC):
    """Load once, then generate / score. Subclasses set `facts` in `load`."""

    name: ClassVar[str]
    facts: ModelFacts

    def __init__(self, device: str = "cpu", dtype: str | None = None, threads: int | None = None) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise BenchError(f"--dtype: unknown {dtype!r}; expected one of {', '.join(DTYPES)}")
        if device.startswith("cuda"):
            import torch

            try:
                index = torch.device(device).index or 0
            except RuntimeError:
                raise BenchError(f"--device: expected cpu or cuda[:N], got {device!r}") from None
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise BenchError(
                    f"--device: {device}: no such CUDA device here ({torch.cuda.device_count()} visible)"
                )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BenchError(f"--threads: expected a positive integer, got {threads!r}")
        self.device = device
        self.dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
        # CPU threads of the backend's own pool (torch intra-op, onnxruntime intra-op); None: the
        # library's default. torch's pool is process-wide, so setting it here sets it for the process.
        self.threads = threads
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    @abstractmethod
    def load(self, model_dir: Path) -> None: ...

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, on_step: OnStep) -> None: ...

    @abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits (T, vocab) float32 for one sequence."""

    def describe(self) -> dict:
        import torch

        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads if self.threads is not None else torch.get_num_threads(),
        }


# ---- ds-models in PyTorch ---------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_ds_model(model_dir: Path, device: str, dtype: str):
    """A ds model directory as a torch module: plain, or quantized through ds-quant (quant.yaml)."""
    from ds_models import ModelError, Transformer

    if (model_dir / "quant.yaml").exists():
        if importlib.util.find_spec("ds_quant") is None:
            raise BenchError(
                f"{model_dir}: quantized model (quant.yaml) needs ds-quant: pip install 'ds-bench[quant]'"
            )
        from ds_quant.checkpoint import load_quantized

        try:
            model = load_quantized(model_dir, device=device)
        except ValueError as e:
            raise BenchError(f"{model_dir}: cannot load: {e}") from None
        # Packed integer weights stay packed; float parts (norms, scales, activations) follow dtype.
        return (model if dtype == "fp32" else model.to(_torch_dtype(dtype))).eval()
    try:
        return Transformer.from_pretrained(model_dir, device=device, dtype=_torch_dtype(dtype)).eval()
    except ModelError as e:
        raise BenchError(f"{model_dir}: cannot load: {e}") from None


def matmul_params(cfg) -> int:
    """Weights multiplied per token: attention and MLP projections of every layer, and the lm_head.
    A static-sparse MLP computes only the neurons it keeps (exports and ds-quant gather them), so
    its width is ds-core's kept count, not ``d_ff``; dynamic mode is counted dense (model FLOPs)."""
    from ds_core import static_keep_count

    d_ff = cfg.d_ff
    if cfg.sparsity_mode == "static" and cfg.sparse_ratio > 0:
        d_ff = static_keep_count(cfg.d_ff, cfg.sparse_ratio)
    per_layer = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * d_ff
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model


def torch_facts(model, dtype: str, quant: str | None) -> ModelFacts:
    from ds_models.footprint import kv_cache_bytes_per_token

    cfg = model.config
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied weight once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embed_bytes = sum(t.numel() * t.element_size() for t in model.embed_tokens.state_dict().values())
    hd = cfg.head_dim
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        matmul_params=matmul_params(cfg),
        # The embedding table is only gathered from, unless it is also the (tied) lm_head.
        matmul_weight_bytes=total - (0 if cfg.tie_embeddings else embed_bytes),
        n_layers=cfg.n_layers,
        d_attn=cfg.n_heads * hd,
        kv_bytes_per_token=int(kv_cache_bytes_per_token(cfg, 4 if dtype == "fp32" else 2)),
        vocab_size=cfg.vocab_size,
        dtype=dtype,
        quant=quant,
    )


def _read_quant(model_dir: Path) -> str | None:
    q = model_dir / "quant.yaml"
    if not q.exists():
        return None
    import yaml

    data = yaml.safe_load(q.read_text(encoding="utf-8")) or {}
    bits = data.get("bits") or data.get("weight_bits")
    return f"int{bits}" if bits else "quantized"


class TorchBackend(Backend):
    name = "torch"
    mode = "eager"

    def load(self, model_dir: Path) -> None:
        self.model = load_ds_model(model_dir, self.device, self.dtype)
        self.facts = torch_facts(self.model, self.dtype, _read_quant(model_dir))

    def generate(self, prompts, max_new_tokens, on_step) -> None:
        from ds_models import generate

        steps = generate(self.model, [list(p) for p in prompts], max_new_tokens, stream=True, mode=self.mode)
        for i, tokens in enumerate(steps):  # _stream calls .tolist(): the tokens are on the host now
            on_step(i, tokens, now())

    def logits(self, ids) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            return self.model(x)[0].float().cpu().numpy()


class TorchFastBackend(TorchBackend):
    name = "torch-fast"
    mode = "auto"

    def describe(self) -> dict:
        from ds_models.generate import _resolve_mode

        d = super().describe()
        d["decode_mode"] = _resolve_mode(self.model, "auto", self.model.embed_tokens.weight.device)
        return d


# ---- Hugging Face transformers on the same weights ----------------------------------------------


def to_hf(model):
    """A transformers LlamaForCausalLM / Qwen2ForCausalLM holding the ds model's weights.

    Built on the meta device and given the ds tensors themselves (no copy, no random init), so the
    baseline costs no extra memory; only the rotary tables are rebuilt for real.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_models.hf_import import export_hf_state_dict, hf_config_dict

    cfg = model.config
    if cfg.sparse_ratio > 0 or cfg.attention_sparse_ratio > 0:
        raise BenchError(
            f"hf backend: the model is sparse (sparse_ratio {cfg.sparse_ratio}, attention_sparse_ratio "
            f"{cfg.attention_sparse_ratio}); transformers would run it dense, which is not the same model"
        )
    fields = hf_config_dict(cfg)
    model_type = fields.pop("model_type")
    fields.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.embed_tokens.weight.dtype)
    hf.load_state_dict(export_hf_state_dict(model), strict=False, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    if missing:
        raise BenchError(f"hf backend: {missing[0]}: no ds weight maps to this transformers parameter")
    device = model.embed_tokens.weight.device
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=hf.config).to(device)
    return hf.eval()


class _StepStreamer:
    """A transformers streamer that stamps each generated step (the first put is the prompt)."""

    def __init__(self, on_step: OnStep) -> None:
        self.on_step, self.step, self.seen_prompt = on_step, 0, False

    def put(self, value) -> None:
        t = now()  # generate() already moved `value` to the host: the tokens are available
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_step(self.step, value.reshape(-1).tolist(), t)
        self.step += 1

    def end(self) -> None:
        pass


class HFBackend(Backend):
    name = "hf"

    def load(self, model_dir: Path) -> None:
        if importlib.util.find_spec("transformers") is None:
            raise BenchError("hf backend needs transformers: pip install 'ds-bench[hf]'")
        if (model_dir / "quant.yaml").exists():
            raise BenchError(f"{model_dir}: quantized (quant.yaml); the hf baseline runs float weights only")
        ds = load_ds_model(model_dir, self.device, self.dtype)
        self.facts = torch_facts(ds, self.dtype, None)
        self.model = to_hf(ds)
        del ds

    def generate(self, prompts, max_new_tokens, on_step) -> None:
        import torch

        ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=self.device)
        streamer = _StepStreamer(on_step)
        with torch.no_grad():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                streamer=streamer,
                pad_token_id=0,
                eos_token_id=None,
            )

    def logits(self, ids) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            return self.model(x).logits[0].float().cpu().numpy()


# ---- ds-quant's ONNX model in onnxruntime ---------------------------------------------------------


class OnnxBackend(Backend):
    """ds_quant.onnx.OnnxModel driven step by step (its forward with the KV cache as inputs/outputs)."""

    name = "onnx"

    def load(self, model_dir: Path) -> None:
        if importlib.util.find_spec("ds_quant") is None:
            raise BenchError("onnx backend needs ds-quant: pip install 'ds-bench[quant]'")
        from ds_models.footprint import count_parameters
        from ds_quant.onnx import PROVIDERS, OnnxModel

        if self.dtype != "fp32":
            raise BenchError(
                f"--dtype: the onnx backend runs the exported graph as is (fp32 activations), not {self.dtype}"
            )
        onnx_file = model_dir / "model.onnx"
        if not onnx_file.is_file():
            raise BenchError(
                f"{model_dir}: no model.onnx (the onnx backend takes a directory written by `ds-quant export --onnx`)"
            )
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        import onnxruntime

        if PROVIDERS[kind] not in onnxruntime.get_available_providers():
            # onnxruntime would fall back to the CPU silently: a CPU number labelled as a GPU one.
            raise BenchError(
                f"--device: {self.device}: this onnxruntime has no {PROVIDERS[kind]} "
                f"(available: {', '.join(onnxruntime.get_available_providers())}; pip install onnxruntime-gpu)"
            )
        try:
            self.model = OnnxModel(model_dir, providers=[PROVIDERS[kind]], threads=self.threads)
        except ValueError as e:
            raise BenchError(f"{model_dir}: cannot load: {e}") from None
        cfg = self.model.config
        weight_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx"))
        hd = cfg.head_dim
        quant = self.model.metadata.get("ds.quant")
        self.facts = ModelFacts(
            params=count_parameters(cfg),
            matmul_params=matmul_params(cfg),
            matmul_weight_bytes=weight_bytes,  # the graph's initializers: packed when quantized
            n_layers=cfg.n_layers,
            d_attn=cfg.n_heads * hd,
            kv_bytes_per_token=2 * cfg.n_layers * cfg.n_kv_heads * hd * 4,
            vocab_size=cfg.vocab_size,
            dtype="fp32",
            quant=f"int{quant['bits']}" if isinstance(quant, dict) and "bits" in quant else None,
        )

    def generate(self, prompts, max_new_tokens, on_step) -> None:
        ids = np.asarray([list(p) for p in prompts], dtype=np.int64)  # equal lengths: no padding
        B, T = ids.shape
        mask = np.ones((B, T), np.int64)
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
        logits, past = self.model.forward(ids, mask, positions, self.model.empty_past(B))
        for step in range(max_new_tokens):
            tok = logits[:, -1].argmax(-1)  # (B,)
            on_step(step, tok.tolist(), now())
            if step == max_new_tokens - 1:
                break
            mask = np.ones((B, T + step + 1), np.int64)
            positions = np.full((B, 1), T + step, np.int64)
            logits, past = self.model.forward(tok[:, None].astype(np.int64), mask, positions, past)

    def logits(self, ids) -> np.ndarray:
        return self.model.logits(np.asarray([list(ids)], dtype=np.int64))[0].astype(np.float32)

    def describe(self) -> dict:
        d = super().describe()
        d["providers"] = self.model.providers
        if self.threads is None:
            d["threads"] = "onnxruntime default (one per physical core)"
        return d


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TorchBackend, TorchFastBackend, OnnxBackend, HFBackend)
}


def make_backend(
    name: str, device: str = "cpu", dtype: str | None = None, threads: int | None = None
) -> Backend:
    if name not in BACKENDS:
        raise BenchError(f"--backend: unknown {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name](device=device, dtype=dtype, threads=threads)
