"""Multi-host start-up for the CLIs: ``jax.distributed`` plus the ``--mesh`` argument.

Every process of a multi-host run executes the same program; :func:`initialize` connects them
(before anything touches a device) and the mesh then spans every device of every process.
Loading with ``gptoss_jax.load(path, mesh=mesh)`` makes each process read only the expert rows
its own devices hold.

``--coordinator-address auto`` (or a cluster launcher that sets ``JAX_COORDINATOR_ADDRESS``)
lets JAX detect the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU); explicit addresses,
process counts and ids override detection. On CPU the cross-process collectives use gloo.

    python -m gptoss_jax.generate --checkpoint ... --mesh expert=8 \\
        --coordinator-address 10.0.0.1:1234 --num-processes 2 --process-id 0   # and id 1
"""

from __future__ import annotations

import argparse
import os

import jax

from gptoss_jax.parallel.mesh import MeshConfig, ShardingError, make_mesh

AUTO = "auto"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` once per process (a second call is a no-op).

    Arguments left ``None`` are detected by JAX's cluster detection; ``"auto"`` as the address
    means the same as ``None``. Must run before the first use of a device.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator_address == AUTO:
        coordinator_address = None
    # CPU processes need a collectives backend to talk to each other; GPUs use NCCL regardless.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)


def _mesh_arg(text: str) -> MeshConfig:
    try:
        return MeshConfig.parse(text)
    except ShardingError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--mesh``, ``--coordinator-address``, ``--num-processes``, ``--process-id``."""
    g = parser.add_argument_group("sharding and multi-host")
    g.add_argument("--mesh", type=_mesh_arg, default=None, metavar="data=N,expert=N,tensor=N",
                   help="shard over a device mesh; the sizes multiply to the number of devices "
                        "of all processes (omitted axes are 1). Default: one device")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0's coordinator, or 'auto' to let JAX "
                        "detect the cluster (SLURM, MPI, Kubernetes, TPU)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-host: number of processes (default: detected)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host: this process's id in [0, N) (default: detected)")
    return parser


def setup_from_args(args: argparse.Namespace,
                    parser: argparse.ArgumentParser | None = None) -> jax.sharding.Mesh | None:
    """Initialize multi-host JAX if asked to, then build the ``--mesh`` (``None`` without one).

    Errors (a mesh not matching the device count, bad process arguments) go to
    ``parser.error`` (exit 2) when a parser is given, else raise ``ValueError``.
    """
    def fail(msg):
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg)

    address = getattr(args, "coordinator_address", None)
    nproc = getattr(args, "num_processes", None)
    pid = getattr(args, "process_id", None)
    if nproc is not None and nproc < 1:
        fail(f"--num-processes must be >= 1, got {nproc}")
    if pid is not None and (pid < 0 or (nproc is not None and pid >= nproc)):
        fail(f"--process-id {pid} is outside [0, {nproc if nproc is not None else 'N'})")
    wanted = (address is not None or nproc is not None or pid is not None
              or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if wanted and not (nproc == 1 and address is None):
        try:
            initialize(address, nproc, pid)
        except (RuntimeError, ValueError) as e:
            fail(f"could not start multi-host JAX: {e}")
    spec = getattr(args, "mesh", None)
    if spec is None:
        if jax.process_count() > 1:
            fail(f"{jax.process_count()} processes need --mesh (e.g. expert="
                 f"{jax.device_count()}) to shard the model over their devices")
        return None
    try:
        return make_mesh(spec)
    except ShardingError as e:
        fail(str(e))
