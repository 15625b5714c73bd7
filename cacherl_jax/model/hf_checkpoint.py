"""Hugging Face Qwen3 checkpoints (`config.json` + safetensors) to and from our parameter tree.

Loading reads each shard of each array straight from the safetensors files (`get_slice`), so a
model placed on a mesh never exists whole on one device or in host memory; at most one shard is
in flight. Saving streams one tensor at a time into safetensors shards that `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from cacherl_jax import parallel
from cacherl_jax.model import params as params_lib
from cacherl_jax.model.config import CheckpointError, Qwen3Config

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


# How each of our arrays is stored by transformers (per layer for the stacked ones):
#   identity   same layout                          (embeddings, norms)
#   transpose  HF [out, in]      ours [in, out]      (MLP projections)
#   heads_out  HF [H*D, E]       ours [E, H, D]      (q/k/v projections)
#   heads_in   HF [E, H*D]       ours [H, D, E]      (output projection)
@dataclasses.dataclass(frozen=True)
class _Layout:
    hf_name: str  # `{i}` stands for the layer index
    kind: str


_LAYOUTS: dict[str, _Layout] = {
    "embed": _Layout("model.embed_tokens.weight", "identity"),
    "final_norm": _Layout("model.norm.weight", "identity"),
    "lm_head": _Layout("lm_head.weight", "identity"),
    "layers.attn_norm": _Layout("model.layers.{i}.input_layernorm.weight", "identity"),
    "layers.mlp_norm": _Layout("model.layers.{i}.post_attention_layernorm.weight", "identity"),
    "layers.q_norm": _Layout("model.layers.{i}.self_attn.q_norm.weight", "identity"),
    "layers.k_norm": _Layout("model.layers.{i}.self_attn.k_norm.weight", "identity"),
    "layers.wq": _Layout("model.layers.{i}.self_attn.q_proj.weight", "heads_out"),
    "layers.wk": _Layout("model.layers.{i}.self_attn.k_proj.weight", "heads_out"),
    "layers.wv": _Layout("model.layers.{i}.self_attn.v_proj.weight", "heads_out"),
    "layers.wo": _Layout("model.layers.{i}.self_attn.o_proj.weight", "heads_in"),
    "layers.w_gate": _Layout("model.layers.{i}.mlp.gate_proj.weight", "transpose"),
    "layers.w_up": _Layout("model.layers.{i}.mlp.up_proj.weight", "transpose"),
    "layers.w_down": _Layout("model.layers.{i}.mlp.down_proj.weight", "transpose"),
}

# Tensors a Qwen3 checkpoint may carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "identity":
        return shape
    if kind == "transpose":
        return shape[::-1]
    if kind == "heads_out":
        e, h, d = shape
        return (h * d, e)
    if kind == "heads_in":
        h, d, e = shape
        return (e, h * d)
    raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "identity":
        return x
    if kind == "transpose":
        return x.T
    if kind == "heads_out":
        e, h, d = x.shape
        return x.transpose(1, 2, 0).reshape(h * d, e)
    if kind == "heads_in":
        h, d, e = x.shape
        return x.transpose(2, 0, 1).reshape(e, h * d)
    raise AssertionError(kind)


def _read_block(
    kind: str, tensor_slice: Any, index: tuple[slice, ...], shape: tuple[int, ...]
) -> np.ndarray:
    """Reads the block `index` of our layout from a safetensors slice in HF layout."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
    if kind == "identity":
        return tensor_slice[index]
    if kind == "transpose":
        return tensor_slice[index[1], index[0]].T
    if kind == "heads_out":
        e, h, d = index
        head_dim = shape[2]
        rows = tensor_slice[h.start * head_dim : h.stop * head_dim, e]
        return rows.reshape(h.stop - h.start, head_dim, -1)[:, d, :].transpose(2, 0, 1)
    if kind == "heads_in":
        h, d, e = index
        head_dim = shape[1]
        cols = tensor_slice[e, h.start * head_dim : h.stop * head_dim]
        return cols.reshape(e.stop - e.start, h.stop - h.start, head_dim)[:, :, d].transpose(
            1, 2, 0
        )
    raise AssertionError(kind)


class _SafetensorsReader:
    """Finds each tensor across `model.safetensors` or the shards of an index, read lazily."""

    def __init__(self, path: Path):
        self.path = path
        index_path, single_path = path / INDEX_FILE, path / SINGLE_FILE
        if index_path.exists():
            index = _read_json(index_path)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            self.file_of = {name: path / file for name, file in index["weight_map"].items()}
            missing = sorted({str(f) for f in self.file_of.values() if not f.exists()})
            if missing:
                raise CheckpointError(f"{index_path} refers to missing files: {', '.join(missing)}")
        elif single_path.exists():
            # safe_open handles are not iterable: .keys() is the API.
            self.file_of = {name: single_path for name in self._open(single_path).keys()}  # noqa: SIM118
        else:
            others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
            hint = f" (found {', '.join(others)}: only safetensors are supported)" if others else ""
            raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")
        self._handles: dict[Path, Any] = {}

    def _open(self, file: Path) -> Any:
        try:
            return safe_open(str(file), framework="numpy")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err

    def get_slice(self, name: str) -> Any:
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        try:
            return self._handles[file].get_slice(name)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({err})") from err

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err


def read_config(path: str | os.PathLike[str], **overrides: Any) -> Qwen3Config:
    """The `Qwen3Config` of a Hugging Face checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE} (expected a Hugging Face checkpoint directory)"
        )
    try:
        return Qwen3Config.from_hf(_read_json(config_file), **overrides)
    except CheckpointError as err:
        raise type(err)(f"{config_file}: {err}") from err


def _expected_tensors(
    config: Qwen3Config,
) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """(our path, HF name, layer or None, HF shape) for every tensor the checkpoint must hold."""
    for path, spec in params_lib.flat_specs(config):
        layout = _LAYOUTS[path]
        if path.startswith("layers."):
            for i in range(config.num_layers):
                yield path, layout.hf_name.format(i=i), i, _hf_shape(layout.kind, spec.shape[1:])
        else:
            yield path, layout.hf_name, None, _hf_shape(layout.kind, spec.shape)


def _hf_order(item: tuple[str, str, int | None, tuple[int, ...]]) -> int:
    our_path, _, layer, _ = item
    if layer is not None:
        return layer
    return -1 if our_path == "embed" else 1 << 30


def _validate(reader: _SafetensorsReader, config: Qwen3Config) -> None:
    expected = list(_expected_tensors(config))
    missing = [name for _, name, _, _ in expected if name not in reader.file_of]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{reader.path}: missing tensors {shown}")
    for _, name, _, hf_shape in expected:
        actual = reader.shape(name)
        if actual != hf_shape:
            raise CheckpointError(
                f"{reader.file_of[name]}: tensor {name} has shape {actual}, config.json implies {hf_shape}"
            )
    known = {name for _, name, _, _ in expected} | {"lm_head.weight"}
    extra = sorted(
        n for n in reader.file_of if n not in known and not n.endswith(_IGNORED_SUFFIXES)
    )
    if extra:
        log.warning(
            "%s: ignoring %d unexpected tensors, e.g. %s", reader.path, len(extra), extra[:3]
        )


def load_hf_checkpoint(
    path: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    dtype: Any = jnp.float32,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
    progress: bool = False,
    **config_overrides: Any,
) -> tuple[Qwen3Config, params_lib.Params]:
    """Reads a Hugging Face Qwen3 checkpoint into `(config, params)`.

    With a mesh, every array is built shard by shard on its devices (per the logical-axis
    `rules`); without one, it lands on the default device. `config_overrides` set runtime fields
    such as `compute_dtype` or `remat`.
    """
    path = Path(path)
    config = read_config(path, **config_overrides)
    reader = _SafetensorsReader(path)
    _validate(reader, config)
    shardings = (
        params_lib.param_shardings(config, mesh, rules)
        if mesh is not None
        else params_lib.map_specs(lambda s: SingleDeviceSharding(jax.devices()[0]), config)
    )
    np_dtype = np.dtype(jnp.dtype(dtype))

    def build(path_name: str, spec: params_lib.ParamSpec, sharding: Any) -> jax.Array:
        layout = _LAYOUTS[path_name]
        stacked = path_name.startswith("layers.")
        shape = spec.shape[1:] if stacked else spec.shape
        blocks: dict[tuple[tuple[int, int, int], ...], np.ndarray] = {}

        def read(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple(s.indices(n) for s, n in zip(index, spec.shape, strict=True))
            if key not in blocks:  # replicated shards are read once
                if stacked:
                    layers = range(*index[0].indices(config.num_layers))
                    block = np.stack(
                        [
                            _read_block(
                                layout.kind,
                                reader.get_slice(layout.hf_name.format(i=i)),
                                index[1:],
                                shape,
                            )
                            for i in layers
                        ]
                    )
                else:
                    block = _read_block(layout.kind, reader.get_slice(layout.hf_name), index, shape)
                blocks[key] = np.ascontiguousarray(block.astype(np_dtype))
            return blocks[key]

        return jax.make_array_from_callback(spec.shape, sharding, read)

    treedef = jax.tree.structure(params_lib.abstract_params(config), is_leaf=params_lib.is_spec)
    items = list(zip(params_lib.flat_specs(config), treedef.flatten_up_to(shardings), strict=True))
    arrays = [
        build(name, spec, sharding)
        for (name, spec), sharding in tqdm(items, desc=f"loading {path.name}", disable=not progress)
    ]
    return config, treedef.unflatten(arrays)


def _host_array(x: jax.Array) -> np.ndarray:
    """The whole of one (possibly sharded, possibly multi-host) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf_checkpoint(
    config: Qwen3Config,
    params: params_lib.Params,
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
) -> Path:
    """Writes `config.json` and safetensors that `transformers` loads as `Qwen3ForCausalLM`.

    One file when the model fits in `max_shard_bytes`, else numbered shards plus an index. Tensors
    are gathered one at a time; on multi-host runs every process must call this, process 0 writes.
    """
    path = Path(path)
    dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
    flat = {params_lib.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    expected = list(_expected_tensors(config))
    unknown = sorted(set(flat) - {p for p, _, _, _ in expected})
    if unknown or len(flat) != len({p for p, _, _, _ in expected}):
        raise CheckpointError(
            f"params do not match the config: unexpected {unknown}, expected {sorted(_LAYOUTS)}"
        )
    out_dtype = dtype or np.dtype(next(iter(flat.values())).dtype)

    def tensor(our_path: str, layer: int | None) -> np.ndarray:
        x = flat[our_path] if layer is None else flat[our_path][layer]
        return np.ascontiguousarray(
            _to_hf(_LAYOUTS[our_path].kind, _host_array(x).astype(out_dtype))
        )

    # Hugging Face order (embeddings, layer by layer, head), so each shard holds whole layers.
    expected.sort(key=_hf_order)
    # Assign tensors to shards from their sizes first, so file names can carry the shard count.
    shards: list[list[tuple[str, str, int | None]]] = [[]]
    shard_bytes = 0
    for our_path, hf_name, layer, hf_shape in expected:
        nbytes = math.prod(hf_shape) * out_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((our_path, hf_name, layer))
        shard_bytes += nbytes

    is_writer = jax.process_index() == 0
    if is_writer:
        path.mkdir(parents=True, exist_ok=True)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total_bytes = 0
    bar = tqdm(total=len(expected), desc=f"saving {path.name}", disable=not progress)
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {}
        for our_path, hf_name, layer in shard:
            tensors[hf_name] = tensor(our_path, layer)
            weight_map[hf_name] = file_name
            total_bytes += tensors[hf_name].nbytes
            bar.update()
        if is_writer:
            save_file(tensors, str(path / file_name), metadata={"format": "pt"})
    bar.close()
    if is_writer:
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
            out_dtype.name
        ]
        (path / CONFIG_FILE).write_text(
            json.dumps(config.to_hf(torch_dtype=torch_dtype), indent=2) + "\n"
        )
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path
