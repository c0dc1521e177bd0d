"""SparsityConfig validation and the backend dispatch point."""

from __future__ import annotations

import pytest
import torch

import ds_core
from ds_core import backends
from ds_core.config import DsCoreError, SparsityConfig, SparsityConfigError


def test_defaults_are_dense():
    cfg = SparsityConfig()
    assert cfg.sparse_ratio == 0.0 and cfg.attention_sparse_ratio == 0.0 and cfg.mode == "dynamic"
    assert (cfg.attention_block_size, cfg.sink_blocks, cfg.local_blocks) == (64, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparse_ratio": 1.0}, "sparse_ratio"),
        ({"sparse_ratio": -0.1}, "sparse_ratio"),
        ({"sparse_ratio": "0.3"}, "sparse_ratio"),
        ({"sparse_ratio": True}, "sparse_ratio"),
        ({"attention_sparse_ratio": 1.5}, "attention_sparse_ratio"),
        ({"mode": "magic"}, "mode"),
        ({"attention_block_size": 0}, "attention_block_size"),
        ({"attention_block_size": 64.0}, "attention_block_size"),
        ({"sink_blocks": -1}, "sink_blocks"),
        ({"local_blocks": -2}, "local_blocks"),
        ({"attention_keep_keys": 0}, "attention_keep_keys"),
        ({"dense_fallback_union": 0.0}, "dense_fallback_union"),
    ],
)
def test_bad_fields_raise_naming_the_field(kwargs, field):
    with pytest.raises(SparsityConfigError, match=field) as info:
        SparsityConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_int_ratio_is_accepted_as_float_and_dict_round_trip():
    cfg = SparsityConfig(sparse_ratio=0, mode="static", attention_keep_keys=2048)
    assert isinstance(cfg.sparse_ratio, float)
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SparsityConfigError, match="sparse_ration: unknown field"):
        SparsityConfig.from_dict({"sparse_ration": 0.3})


def test_resolve_auto_picks_torch_on_cpu_and_names_bad_backends(monkeypatch):
    assert backends.resolve("auto", "cpu") == "torch"
    assert backends.resolve("torch", "cpu") == "torch"
    with pytest.raises(DsCoreError, match="backend: expected one of auto, torch, triton, got 'cuda'"):
        backends.resolve("cuda", "cpu")


def test_forced_triton_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DsCoreError, match="backend: 'triton' cannot run here"):
        backends.resolve("triton", "cpu")


def test_set_backend_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.forced_backend() == "auto"
    with ds_core.set_backend("torch"):
        assert backends.forced_backend() == "torch"
        with ds_core.set_backend("triton"):
            assert backends.forced_backend() == "triton"
        assert backends.forced_backend() == "torch"
    assert backends.forced_backend() == "auto"
    ds_core.set_backend("torch")  # plain call: stays until reset
    assert backends.resolve("auto", "cpu") == "torch"
    ds_core.reset_backend()
    assert backends.forced_backend() == "auto"
    with pytest.raises(DsCoreError, match="set_backend"):
        ds_core.set_backend("fast")


def test_env_var_forces_auto_but_an_explicit_backend_wins(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DS_CORE_BACKEND", "triton")
    assert backends.resolve("auto", "cpu") == "triton"
    assert backends.resolve("torch", "cpu") == "torch"
    with ds_core.set_backend("torch"):  # the context manager wins over the environment
        assert backends.resolve("auto", "cpu") == "torch"
    monkeypatch.setenv("DS_CORE_BACKEND", "gpu")
    with pytest.raises(DsCoreError, match="DS_CORE_BACKEND"):
        backends.resolve("auto", "cpu")


def test_triton_availability_follows_device_and_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backends.triton_available("cpu")
    assert backends.triton_available(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_available("cpu")
