"""The model directory: what save_pretrained writes and from_pretrained reads.

    config.yaml                       ModelConfig fields
    model.safetensors                 all weights, or, above `max_shard_bytes`:
    model-00001-of-0000N.safetensors  shards plus
    model.safetensors.index.json      {"metadata": {"total_size": ...}, "weight_map": {name: shard}}
    tokenizer.json                    optional, HF tokenizers format
    provenance.json                   what produced it (package versions, parent, data, command)
    quant.yaml                        only for quantized weights (written by ds-quant)

Only safetensors and YAML/JSON are read: loading a directory never executes code from it.
Writes are atomic: a new directory is built under a temporary name beside the target and renamed;
into an existing directory each file is written to a temporary name and os.replace'd, and weight
files of an earlier save that the new one does not use are removed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ds_models.config import REGISTRY, ModelConfig, ModelError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ds_models.model import Transformer

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
PROVENANCE_FILE = "provenance.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3  # 4 GiB, like HF's default "5GB" but in powers of two


# ---- writing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `directory`; on success its files land in `directory`."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.rename(tmp, target)
            return
        if not target.is_dir():
            raise ModelError(f"{target}: exists and is not a directory")
        new_files = {p.name for p in tmp.iterdir()}
        for p in tmp.iterdir():
            os.replace(p, target / p.name)
        if WEIGHTS_FILE in new_files or INDEX_FILE in new_files:
            # Weight files of an earlier save that the new one doesn't use would confuse a reader.
            for old in target.iterdir():
                if old.name not in new_files and _is_weight_file(old.name):
                    old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_weight_file(name: str) -> bool:
    return name in (WEIGHTS_FILE, INDEX_FILE) or (name.startswith("model-") and name.endswith(".safetensors"))


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Stream (name, tensor) pairs into model.safetensors, or shards + index above max_shard_bytes.

    Holds at most one shard in memory, so importing a 67B checkpoint does not need 134 GB of RAM.
    Returns the file names written.
    """
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[str] = []
    pending: list[str] = []  # shard files written under provisional names until the count is known
    total = 0

    def flush() -> None:
        tmp_name = f"shard-{len(pending):05d}.partial"
        save_file(shards[-1], str(directory / tmp_name), metadata={"format": "pt"})
        pending.append(tmp_name)

    weight_map: dict[str, int] = {}
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer (fused q/k/v): safetensors wants its own storage
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards[-1] = {}
            size = 0
        shards[-1][name] = t
        weight_map[name] = len(pending)
        size += nbytes
        total += nbytes
    if not pending:  # everything fits into one file
        save_file(shards[-1], str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    flush()
    n = len(pending)
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp_name, name in zip(pending, final):
        os.replace(directory / tmp_name, directory / name)
        names.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in weight_map.items()}}
    _write_json(directory / INDEX_FILE, index)
    return [*names, INDEX_FILE]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _state_items(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    # state_dict() lists a tied lm_head.weight too; safetensors refuses shared storage, and the
    # config's tie_embeddings already says how to rebuild it.
    for name, t in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        yield name, t


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import ds_core
    import ds_models

    # our own packages by their __version__: they also run from a source tree (PYTHONPATH), where
    # no distribution metadata exists
    out = {"ds-core": ds_core.__version__, "ds-models": ds_models.__version__}
    for dist in ("torch", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def write_provenance(directory: str | os.PathLike[str], **fields: Any) -> Path:
    """Write (or update) provenance.json: `fields` merged over what is there, plus versions and time.

    Callers pass what produced the model, e.g. parent="ds-1.5b", data="...", command="ds-train ...".
    """
    path = Path(directory) / PROVENANCE_FILE
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
    data.update(fields)
    data["packages"] = {**data.get("packages", {}), **package_versions()}
    data["written_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_json(path, data)
    return path


def save_pretrained(
    model: Transformer,
    directory: str | os.PathLike[str],
    *,
    provenance: dict | None = None,
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.config.to_yaml(tmp / CONFIG_FILE)
        write_safetensors(_state_items(model), tmp, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            else:
                tokenizer.save(str(tmp / TOKENIZER_FILE))
        old = directory / PROVENANCE_FILE
        if old.exists():  # keep the history of an existing directory, update its fields
            shutil.copyfile(old, tmp / PROVENANCE_FILE)
        write_provenance(tmp, **(provenance or {}))
    return directory


# ---- reading ------------------------------------------------------------------------------------


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer | None:
    """The directory's tokenizer.json as a `tokenizers.Tokenizer`, or None when it has none."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelError(f"{path}: not a valid tokenizers file: {e}") from None


def weight_files(directory: Path) -> dict[str, list[str]]:
    """Map each weight file of the directory to the tensor names the index promises in it."""
    index_path = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise ModelError(f"{index_path}: weight_map: expected {{tensor name: shard file}}") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (directory / file).exists():
                raise ModelError(f"{directory / file}: missing (listed in {INDEX_FILE} for {files[file][0]})")
        return files
    if single.exists():
        return {WEIGHTS_FILE: []}
    raise ModelError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def iter_safetensors(
    directory: Path, device: str = "cpu", *, lazy: bool = False
) -> Iterator[tuple[str, str, Any]]:
    """Yield (file, tensor name, tensor) over the directory's weight files, with file-naming errors.

    lazy: yield safetensors' slice handle instead of the tensor (``.get_shape()``, ``.get_dtype()``,
    ``[index]`` reads only the indexed part); valid until the next item is requested."""
    for file, promised in weight_files(directory).items():
        path = directory / file
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                keys = list(f.keys())
                missing = sorted(set(promised) - set(keys))
                if missing:
                    raise ModelError(f"{path}: {missing[0]}: missing (listed in {INDEX_FILE})")
                for key in keys:
                    yield file, key, f.get_slice(key) if lazy else f.get_tensor(key)
        except SafetensorError as e:
            raise ModelError(f"{path}: corrupt or not a safetensors file ({e})") from None
        except (OSError, ValueError) as e:
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"{path}: cannot read ({e})") from None


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation while building a model whose weights are loaded next."""
    names = [
        "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
        "xavier_uniform_", "xavier_normal_", "orthogonal_",
    ]  # fmt: skip
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _build(config: ModelConfig, device, dtype, init: bool) -> Transformer:
    from ds_models.model import Transformer

    old_dtype = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"), contextlib.nullcontext() if init else _no_init():
            return Transformer(config)
    finally:
        torch.set_default_dtype(old_dtype)


def _allowed_missing(model: Transformer) -> set[str]:
    """State keys a checkpoint may lack: ds_core's sparse state (HF checkpoints have none)."""
    out = set()
    for mname, module in model.named_modules():
        keys = getattr(module, "sparse_state_keys", None)
        if callable(keys):
            out.update(f"{mname}.{k}" if mname else k for k in keys())
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_dtype(directory: Path) -> torch.dtype:
    """The floating dtype the weights were saved in (loading keeps it unless asked otherwise)."""
    file = next(iter(weight_files(directory)))
    try:
        with safe_open(str(directory / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                dt = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dt is not None:
                    return dt
    except SafetensorError as e:
        raise ModelError(f"{directory / file}: corrupt or not a safetensors file ({e})") from None
    return torch.float32


def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a model directory (errors name the directory or file)."""
    path = Path(directory)
    if not path.exists():
        raise ModelError(f"{directory}: no such model directory")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        raise ModelError(f"{config_path}: missing")
    return ModelConfig.from_yaml(config_path)


def stored_dtype(directory: str | os.PathLike[str]) -> torch.dtype:
    """The floating dtype a model directory's weights were saved in."""
    return _stored_dtype(Path(directory))


def load_pretrained(
    name_or_dir: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A model directory, or a registry name (randomly initialised, seeded by the caller)."""
    path = Path(name_or_dir)
    if not path.exists() and str(name_or_dir) in REGISTRY:
        return _build(ModelConfig.from_name(str(name_or_dir)), device, dtype, init=True).eval()
    if not path.exists():
        raise ModelError(f"{name_or_dir}: no such model directory or registry name ({', '.join(REGISTRY)})")
    config = read_config(path)
    model = _build(config, device, dtype or _stored_dtype(path), init=False)
    return load_weights(model, path).eval()


def load_weights(model: Transformer, directory: str | os.PathLike[str]) -> Transformer:
    """Copy a model directory's weights into `model` (built from its config.yaml) and return it.

    Every tensor is checked (known name, shape, kind of dtype, no duplicates, nothing missing but
    ds-core's sparse state). A parameter sharded over a device mesh (a DTensor, see
    ds_models.parallel) receives only this rank's part, read from the file by slice, so no rank
    reads the whole of a sharded weight.
    """
    path = Path(directory)
    config_name = CONFIG_FILE
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    allowed_missing = _allowed_missing(model)
    seen: dict[str, str] = {}
    with torch.no_grad():
        for file, name, stored in iter_safetensors(path, lazy=True):
            where = path / file
            if name in seen:
                raise ModelError(f"{where}: {name}: also in {seen[name]}")
            seen[name] = file
            if name not in expected:
                raise ModelError(f"{where}: {name}: unexpected tensor (not in a {config_name} model)")
            target = expected[name]
            shape = tuple(stored.get_shape())
            if shape != tuple(target.shape):
                raise ModelError(
                    f"{where}: {name}: shape {shape} does not match the config's {tuple(target.shape)}"
                )
            code = stored.get_dtype()
            if (code.startswith("F") or code == "BF16") != target.dtype.is_floating_point:
                raise ModelError(f"{where}: {name}: dtype {code}, expected a {target.dtype}-like tensor")
            local, index = _local_part(target)
            local.copy_(stored[index if index is not None else ...])
    missing = sorted(set(expected) - set(seen) - allowed_missing)
    if missing:
        raise ModelError(
            f"{path}: {missing[0]}: missing from the weight files ({len(missing)} tensors missing)"
        )
    if allowed_missing - set(seen):
        # ds_core's SparseMLP derives absent sparse state (HF checkpoints have none) from the loaded
        # weights in its load hook: run load_state_dict over what is now in place to trigger it.
        present = {k: v for k, v in model.state_dict().items() if k in seen}
        model.load_state_dict(present, strict=False)
    return model


def _local_part(target: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
    """(the tensor to copy into, the index of its part of the stored tensor; None = all of it).

    A DTensor sharded on a 1-D mesh holds torch.chunk's part of its sharded dimension: chunks of
    ceil(n / size), rank r from r * chunk."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(target, DTensor):
        return target, None
    local = target.to_local()
    placement = target.placements[0]
    if len(target.placements) != 1 or not isinstance(placement, Shard):
        return local, None  # replicated: every rank holds the whole tensor
    dim, n = placement.dim, target.shape[placement.dim]
    chunk = -(-n // target.device_mesh.size())
    start = min(target.device_mesh.get_local_rank() * chunk, n)
    index = [slice(None)] * target.dim()
    index[dim] = slice(start, start + local.shape[dim])
    return local, tuple(index)
