"""Device mesh, the logical-axis rules table, and sharded parameter placement.

Every parameter and large activation names its logical axes ('batch', 'embed', 'heads', ...).
`LOGICAL_RULES` maps each logical axis to mesh axes of the ('data', 'fsdp', 'tensor') mesh.
A mesh axis is used at most once per array: when a later dimension asks for an axis that an
earlier one already took, that dimension stays replicated (e.g. activations
('batch', 'length', 'embed') -> (('data', 'fsdp'), None, None)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tried in order; None = replicated). The one table for the project.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    # The residual stream between blocks (what remat saves for the backward pass): sequence
    # parallelism, as Megatron-LM's. Inside a block the heads and the MLP take 'tensor', so XLA
    # all-gathers the sequence before the projections and reduce-scatters after them.
    ("activation_length", ("tensor",)),
    ("cache_length", None),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("sprm_hidden", ("tensor",)),
    ("norm", None),
    ("layers", None),
)
_RULES = dict(LOGICAL_RULES)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    *,
    strict: bool = True,
    name: str = "array",
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with `LOGICAL_RULES`.

    With `shape` and `mesh_shape`, a mesh axis that does not divide its dimension raises (strict,
    used for parameters) or is dropped (non-strict, used for activations whose batch may be small).
    """
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(axes):
        if logical is None:
            spec.append(None)
            continue
        if logical not in _RULES:
            raise ValueError(
                f"{name}: logical axis {logical!r} is not in the rules table; "
                f"known axes: {sorted(_RULES)}"
            )
        mesh_axes = []
        size = 1
        for axis in _RULES[logical] or ():
            if axis not in MESH_AXES:
                raise ValueError(f"rules table: {logical!r} maps to unknown mesh axis {axis!r}")
            if axis in used:
                continue
            n = mesh_shape.get(axis, 1) if mesh_shape is not None else 1
            if shape is not None and mesh_shape is not None and shape[dim] % (size * n):
                if strict:
                    raise ValueError(
                        f"{name}: dimension {dim} ({logical}, size {shape[dim]}) is not divisible "
                        f"by mesh axis {axis!r} (size {n}); change the mesh or the model shape"
                    )
                continue
            size *= n
            mesh_axes.append(axis)
        used.update(mesh_axes)
        spec.append(
            tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None)
        )
    return PartitionSpec(*spec)


MESH_FORM = "data:N,fsdp:N,tensor:N"


def parse_mesh(text: str) -> dict[str, int]:
    """`--mesh=data:1,fsdp:8,tensor:1` -> {'data': 1, 'fsdp': 8, 'tensor': 1}: the one mesh syntax
    of every command line. Missing axes are 1; one size may be -1 (the remaining devices, filled
    in by `resolve_mesh_shape`). A bad form, axis or size is a ValueError naming the flag."""
    expected = f"expected AXIS:N pairs such as {MESH_FORM} (AXIS in {', '.join(MESH_AXES)})"
    mesh: dict[str, int] = {}
    for part in text.split(","):
        axis, sep, size = part.strip().partition(":")
        if not sep:
            old = " (the AXIS=N form is not accepted)" if "=" in part else ""
            raise ValueError(f"--mesh={text}: {expected}{old}")
        if axis not in MESH_AXES:
            raise ValueError(f"--mesh={text}: unknown axis {axis!r}; {expected}")
        if axis in mesh:
            raise ValueError(f"--mesh={text}: axis {axis!r} is given twice")
        try:
            mesh[axis] = int(size)
        except ValueError:
            raise ValueError(f"--mesh={text}: size of {axis!r} is not an integer") from None
        if mesh[axis] == 0 or mesh[axis] < -1:
            raise ValueError(f"--mesh={text}: size of {axis!r} must be positive or -1")
    return {axis: mesh.get(axis, 1) for axis in MESH_AXES}


def resolve_mesh_shape(mesh_shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fills one -1 entry with the remaining devices; checks the product equals `n_devices`."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; expected axes {MESH_AXES}")
    shape = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, n in shape.items() if n == -1]
    for axis, n in shape.items():
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{axis}: expected a positive size or -1, got {n}")
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"mesh.{free[0]}: the other axes use {fixed} devices, which does not divide the "
                f"{n_devices} available devices"
            )
        shape[free[0]] = n_devices // fixed
    total = math.prod(shape.values())
    if total != n_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {total} ({shape}) must equal the device count {n_devices}"
        )
    return shape


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
    """A ('data','fsdp','tensor') mesh with Auto axis types over `devices` (default: all).

    Over several TPU slices (multislice: devices carry `slice_index`) the mesh is hybrid: see
    `hybrid_device_grid`."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    sizes = tuple(shape[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * 3
    grid = hybrid_device_grid(devices, sizes)
    if grid is not None:
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def hybrid_device_grid(devices: Sequence, sizes: tuple[int, int, int]) -> np.ndarray | None:
    """Devices as a [data, fsdp, tensor] array for a multi-slice job, else None (one slice).

    Only the data axis crosses slices: each slice holds data/S consecutive rows of the mesh, so
    fsdp and tensor collectives stay on the fast intra-slice links (ICI) and only the gradient
    all-reduce of data parallelism goes over the data-centre network (DCN). Within a slice the
    layout is the topology-aware `mesh_utils.create_device_mesh` where the platform supports it.
    """
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) == 1:
        return None
    n = len(slices)
    data, fsdp, tensor = sizes
    if data % n:
        raise ValueError(
            f"mesh data={data}: with {n} slices the data axis must be a multiple of {n} (data "
            "parallelism is what runs across slices); move devices from fsdp to data"
        )
    per_slice = [sorted((d for d in devices if d.slice_index == s), key=lambda d: d.id)
                 for s in slices]  # fmt: skip
    if len({len(p) for p in per_slice}) != 1:
        raise ValueError(f"slices of unequal sizes: {[len(p) for p in per_slice]} devices")
    blocks = []
    for members in per_slice:
        shape = (data // n, fsdp, tensor)
        try:
            blocks.append(mesh_utils.create_device_mesh(shape, devices=members))
        except Exception:  # no topology information (CPU, test doubles): keep id order
            blocks.append(np.array(members, dtype=object).reshape(shape))
    return np.concatenate(blocks, axis=0)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
        return x
    spec = logical_to_spec(axes, x.shape, dict(mesh.shape), strict=False, name="activation")
    return jax.lax.with_sharding_constraint(x, spec)


def sequence_sharded() -> bool:
    """Whether the current mesh splits the residual stream along the sequence (the
    'activation_length' rule's axes, of size > 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
        return False
    return any(dict(mesh.shape)[a] > 1 for a in _RULES["activation_length"] or ())


def _path_name(path) -> str:
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if part != "value":
            parts.append(str(part))
    return ".".join(parts)


def state_specs(abstract_state, mesh_shape: Mapping[str, int]):
    """PartitionSpecs for an nnx State whose Variables carry `axes` metadata (same tree shape)."""

    def spec(path, var):
        axes = var.get_metadata().get("axes")
        name = _path_name(path)
        if axes is None:
            raise ValueError(f"parameter {name}: no logical `axes` metadata")
        if len(axes) != len(var.get_value().shape):
            raise ValueError(
                f"parameter {name}: axes {axes} do not match shape {var.get_value().shape}"
            )
        return var.replace(logical_to_spec(axes, var.get_value().shape, mesh_shape, name=name))

    return jax.tree_util.tree_map_with_path(
        spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def state_shardings(abstract_state, mesh):
    """NamedShardings for every leaf of an abstract nnx State on `mesh`."""
    specs = state_specs(abstract_state, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def placement(abstract_state, mesh=None) -> dict:
    """Pure dict (as `nnx.to_pure_dict`) of where each parameter goes: its NamedSharding on
    `mesh`, or the first device without one."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract_state))
    return nnx.to_pure_dict(state_shardings(abstract_state, mesh))


def sharded_abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings` (same structure):
    a restore target that places every array straight into its sharding."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def bytes_per_device(abstract_state, mesh_shape: Mapping[str, int]) -> int:
    """Bytes that the largest shard of every parameter occupies on one device (no allocation)."""
    specs = state_specs(abstract_state, mesh_shape)
    total = 0
    vars_ = jax.tree.leaves(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var, spec in zip(vars_, jax.tree.leaves(specs), strict=True):
        shard = list(var.get_value().shape)
        for dim, axes in enumerate(spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                shard[dim] = -(-shard[dim] // mesh_shape.get(axis, 1))
        total += math.prod(shard) * np.dtype(var.get_value().dtype).itemsize
    return total


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` on multi-process launches; a no-op on one process.

    Multi-process is detected from the coordinator environment (JAX_COORDINATOR_ADDRESS, set by
    our launch scripts and by xpk) or a multi-worker Cloud TPU VM (TPU_WORKER_HOSTNAMES lists
    several hosts; there JAX finds the rest itself). Elsewhere (several processes on one
    machine, a plain cluster) JAX_NUM_PROCESSES and JAX_PROCESS_ID give the process layout.
    CPU processes exchange collectives through gloo. Returns whether initialisation ran.
    """
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi_tpu = len([h for h in hosts.split(",") if h]) > 1
    if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or multi_tpu):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(env)
        if value is not None:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"{env}={value!r}: expected an integer") from None
    # Only read by the CPU client (no effect on TPU); must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
    jax.distributed.initialize()
    return True
