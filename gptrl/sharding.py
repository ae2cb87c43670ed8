"""The device mesh and the one table that maps logical axis names to mesh axes.

Only this module knows the mesh axis names ("data", "fsdp", "tensor"). Models annotate parameters and
activations with *logical* names (`embed`, `mlp`, `heads`, `batch`, ...); `RULES` says which mesh axis each
one is split over, so changing the parallelism is a config change (`config.mesh`), never a code change.

Mesh axes:
  data:   pure data parallelism; parameters replicated.
  fsdp:   data parallelism with parameters and optimizer state sharded along `embed` (ZeRO-3 style).
  tensor: tensor parallelism (Megatron): heads, MLP hidden units and the vocabulary are split.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptrl import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). The first rule that names a mesh axis not
# already used by another dimension of the same array wins.
RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("positions", None),
    ("norm", None),
    ("ensemble", None),  # a reward-model ensemble's members (gptrl/reward_model.py RewardEnsemble)
)


def resolve_mesh_shape(mesh_config: config_lib.MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Fills in the `-1` axis of `mesh_config` so that the sizes multiply to `num_devices`.

  Raises:
    ConfigError: if the sizes cannot multiply to the device count.
  """
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise config_lib.ConfigError(
          f"config.mesh: sizes {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
          f"({num_devices} is not divisible by {known}).")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise config_lib.ConfigError(
        f"config.mesh: sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, but there are {num_devices} "
        "devices. Make them multiply to the device count, or set one axis to -1 ('the rest').")
  return tuple(sizes)


def make_mesh(mesh_config: config_lib.MeshConfig, devices: Sequence[jax.Device] | None = None, *,
              whole: bool | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  `whole`: the devices are a whole slice (default: when they are all of `jax.devices()`; gptrl/compile.py says so
  for a TPU topology's devices), laid out by their physical topology; else in the order given (a sub-mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  if whole is None:
    whole = len(devices) == len(jax.devices())
  if whole:
    # Lets JAX order devices so that the inner axes (tensor) sit on the fastest interconnect.
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
    except (NotImplementedError, ValueError) as e:
      # An axis that is no product of whole physical axes (e.g. tensor=2 on a 4x4x4 v5p torus): JAX's layout
      # refuses it unless physical axes may be split; the split keeps neighbours on one physical axis.
      from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
      logging.info("Mesh %s over the slice: splitting physical axes (%s).", dict(zip(MESH_AXES, shape)),
                   str(e).split(".")[0])
      return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES,
                  axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
  """Context in which models' logical constraints resolve against `mesh` and `RULES` (trace inside it)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield mesh


def _mesh_axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_named_sharding(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """Maps one array's logical PartitionSpec to a NamedSharding on `mesh`.

  A dimension whose size is not divisible by its mesh axes is replicated instead (with a log line), so small
  test models and odd vocabularies still run on any mesh.
  """
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), RULES)
  fixed = []
  for dim, (size, axes) in enumerate(zip(shape, mesh_spec)):
    if axes is not None and size % _mesh_axes_size(mesh, axes):
      logging.info("Replicating dim %d (%s, size %d) of an array: not divisible by mesh axes %s.",
                   dim, logical_spec[dim], size, axes)
      axes = None
    fixed.append(axes)
  return NamedSharding(mesh, PartitionSpec(*fixed))


def tree_shardings(boxed_abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of (abstract) arrays boxed with `nn.LogicallyPartitioned` metadata.

  Leaves without metadata are replicated. The result has the structure of the *unboxed* tree.
  """
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                        boxed_abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda spec, x: logical_to_named_sharding(spec, x.shape, mesh), logical_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a data batch [B, ...]: the batch over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device (scalars, RNG keys, small state)."""
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (the global batch must be divisible by it)."""
  return _mesh_axes_size(mesh, BATCH_AXES)


def host_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items()}
