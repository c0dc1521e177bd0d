"""Static-sparse MLPs as the smaller dense MLP of their kept neurons, before anything is quantized.

A ds-core ``SparseMLP`` in ``static`` mode computes ``down(silu(gate(x)) * up(x) * mask)`` where the
0/1 mask keeps ``SparseMLP.static_keep_indices()`` (ds-core's own rule, 64-aligned from d_ff 1024
on): the other neurons contribute exactly 0. So the same function is a plain SwiGLU over the kept
rows of gate/up and the kept columns of down — the weights nobody reads are dropped instead of
being quantized, packed, stored and exported with a mask. `quantize` swaps every static-sparse
MLP for a `GatheredMLP` first (GPTQ then sees the gathered shapes), `save_quantized` records each
one's kept width in ``quant.yaml`` (``gathered_mlps``), and `load_quantized` rebuilds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatheredMLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` over the ``d_kept`` neurons a static SparseMLP kept.

    Submodules keep the HF names ``gate_proj`` / ``up_proj`` / ``down_proj``, so quantization
    plans, overrides and state-dict keys read exactly as for the SparseMLP it replaces.
    """

    def __init__(self, d_model: int, d_kept: int, *, bias: bool = False, device=None) -> None:
        super().__init__()
        self.d_model, self.d_kept = d_model, d_kept
        self.gate_proj = nn.Linear(d_model, d_kept, bias=bias, device=device)
        self.up_proj = nn.Linear(d_model, d_kept, bias=bias, device=device)
        self.down_proj = nn.Linear(d_kept, d_model, bias=bias, device=device)

    @classmethod
    @torch.no_grad()
    def from_sparse(cls, mlp: nn.Module) -> GatheredMLP:
        """The kept rows of gate/up and columns of down of a static-mode ds_core.SparseMLP."""
        keep = mlp.static_keep_indices().to(mlp.gate_proj.weight.device)  # (k,) ascending
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        out = cls(mlp.d_model, keep.numel(), bias=g.bias is not None, device="meta")
        out.gate_proj = _linear(g.weight[keep], None if g.bias is None else g.bias[keep])
        out.up_proj = _linear(u.weight[keep], None if u.bias is None else u.bias[keep])
        out.down_proj = _linear(d.weight[:, keep], d.bias)
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_kept={self.d_kept}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_model) -> (..., d_model)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # hidden (..., d_kept)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


def is_static_sparse(module: nn.Module) -> bool:
    sparsity = getattr(module, "sparsity", None)
    return (
        getattr(sparsity, "mode", None) == "static"
        and getattr(sparsity, "sparse_ratio", 0.0) > 0
        and hasattr(module, "static_keep_indices")
    )


def gather_static_mlps(model: nn.Module) -> dict[str, int]:
    """Swap every static-sparse MLP of `model` for its GatheredMLP (in place); {name: kept width}."""
    out: dict[str, int] = {}
    for name, mod in list(model.named_modules()):
        if is_static_sparse(mod):
            parent, _, attr = name.rpartition(".")
            gathered = GatheredMLP.from_sparse(mod)
            setattr(model.get_submodule(parent) if parent else model, attr, gathered)
            out[name] = gathered.d_kept
    return out


def gathered_widths(model: nn.Module) -> dict[str, int]:
    """{module name: kept width} of the GatheredMLPs a (quantized) model holds."""
    return {name: m.d_kept for name, m in model.named_modules() if isinstance(m, GatheredMLP)}
