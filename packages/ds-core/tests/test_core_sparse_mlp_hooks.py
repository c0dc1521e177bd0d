"""Observed projections run as modules: GPTQ and activation statistics hook gate/up/down_proj, and the
packed fast paths (which read the weights directly) would silently starve those hooks."""

from __future__ import annotations

import pytest
import torch

from ds_core import SparseMLP, SparsityConfig, calibration


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_core_hooks_on_projections_fire_in_eval(mode: str) -> None:
    torch.manual_seed(0)
    mlp = SparseMLP(64, 160, SparsityConfig(sparse_ratio=0.5, mode=mode)).eval()
    x = torch.randn(3, 5, 64)
    if mode == "dynamic":
        with calibration(mlp), torch.no_grad():
            mlp(x)
    with torch.no_grad():
        fast = mlp(x)
    seen: dict[str, int] = {}
    handles = [
        getattr(mlp, name).register_forward_hook(
            lambda m, a, y, name=name: seen.__setitem__(name, a[0].shape[-1])
        )
        for name in ("gate_proj", "up_proj", "down_proj")
    ]
    with torch.no_grad():
        hooked = mlp(x)
    for h in handles:
        h.remove()
    assert seen == {"gate_proj": 64, "up_proj": 64, "down_proj": 160}
    torch.testing.assert_close(hooked, fast, rtol=1e-5, atol=1e-5)  # same function, module path
