"""Multi-host runs with JAX's own distributed runtime (`jax.distributed.initialize`), and "only process 0 talks".

Every process runs the same script; together their devices form one global mesh (`jax.devices()` lists them all, in
process order, so `sharding.make_mesh` puts each host's devices next to each other on the `model` axis when it can):

    # host 0                                                 # host 1
    neox-jax generate --checkpoint CKPT --mesh data=2,model=4 \\   neox-jax generate --checkpoint CKPT ... \\
      --coordinator host0:1234 --num-processes 2 \\               --coordinator host0:1234 --num-processes 2 \\
      --process-id 0                                            --process-id 1

On SLURM, Open MPI, Kubernetes (JobSet) or Cloud TPU pods, pass `--distributed` instead and JAX reads the same three
values from the environment; the variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID stand in
for the three flags. A loopback
coordinator (127.0.0.1 / localhost) binds to loopback only. On CPU, the processes talk through gloo (JAX's default
`jax_cpu_collectives_implementation` since 0.4.3x; set here explicitly).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def add_arguments(parser: argparse.ArgumentParser, mesh: bool = True) -> argparse.ArgumentParser:
    """Adds --mesh (unless mesh=False) and the multi-host flags; `setup(args)` then acts on them."""
    if mesh:
        parser.add_argument(
            "--mesh",
            default=None,
            metavar="SPEC",
            help="shard over a device mesh, e.g. 'data=2,model=4' or 'model=-1' (every device on "
            "model: tensor parallel); default: one device (every device on model when several "
            "processes take part)",
        )
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0's coordinator service; every process passes the same one",
    )
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="read coordinator / process count / id from the environment (SLURM, Open MPI, k8s, Cloud TPU)",
    )
    g.add_argument(
        "--init-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds to wait for every process to join (default 300)",
    )
    return parser


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    timeout: int = 300,
) -> bool:
    """Calls jax.distributed.initialize when asked to (a coordinator from the arguments or JAX_COORDINATOR_ADDRESS, or
    `auto`: JAX's cluster detection); must run before anything touches a device. Checks the values first (nothing
    started when they are wrong). Returns whether this is a multi-process run."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    for name, value in (("JAX_NUM_PROCESSES", num_processes), ("JAX_PROCESS_ID", process_id)):
        if value is None and os.environ.get(name, "").strip():
            if not os.environ[name].strip().isdigit():
                raise ValueError(f"{name}={os.environ[name]!r} is not a non-negative int")
            if name == "JAX_NUM_PROCESSES":
                num_processes = int(os.environ[name])
            else:
                process_id = int(os.environ[name])
    if coordinator is None and not auto:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT (or --distributed)")
        return False
    if coordinator is not None and (num_processes is None) != (process_id is None) and not auto:
        raise ValueError("give both --num-processes and --process-id with --coordinator")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
    bind = None
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad --coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
        if host in LOOPBACK:
            bind = coordinator
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
        coordinator_bind_address=bind,
    )
    return jax.process_count() > 1


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize(args.coordinator, args.num_processes, args.process_id, args.distributed, args.init_timeout)


def setup(args: argparse.Namespace):
    """For scripts: jax.distributed.initialize if the flags ask for it, then the mesh from --mesh (None: one device,
    unless several processes take part: then every device on `model`)."""
    multi = initialize_from_args(args)
    spec = getattr(args, "mesh", None)
    if spec is None and not multi:
        return None
    from neox_jax.parallel import sharding

    return sharding.make_mesh(spec)


def is_main() -> bool:
    """True on process 0 (and in a single-process run): the one that prints and writes files."""
    return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
    """print() on process 0 only."""
    if is_main():
        print(*args, **kwargs)
        sys.stdout.flush()
