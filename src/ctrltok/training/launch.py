"""Make ``accelerate launch --cpu --num_processes N -m ctrltok train ...`` start N processes.

accelerate (checked on 1.15) starts several CPU processes only through ``mpirun`` and a hostfile
(``--mpirun_hostfile``). Without one, its simple launcher starts *one* process: it exports
``ACCELERATE_USE_CPU``, ``MASTER_ADDR`` and ``MASTER_PORT`` but no ``RANK`` or ``WORLD_SIZE``, so
a user who asked for two processes silently trains with one (and half the global batch).

When ``ctrltok train`` finds itself in that situation it reads the launch command of its parent
(the ``accelerate launch`` process) with accelerate's own argument parser, and if more than one
process was asked for, starts them itself through ``torch.distributed.run`` with the same address,
port and environment; each of those processes then sees ``RANK``/``WORLD_SIZE`` and accelerate's
Accelerator drives them as a normal multi-CPU (gloo) job::

    accelerate launch --cpu --num_processes 2        ctrltok train (no RANK: accelerate started one)
        -m ctrltok train RECIPE.yaml          ->         torch.distributed.run --nproc_per_node 2
                                                            ctrltok train  (RANK 0)
                                                            ctrltok train  (RANK 1)

``torchrun --nproc_per_node N -m ctrltok train ...`` works directly and needs none of this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

RELAUNCHED = "CTRLTOK_RELAUNCHED"  # set in the processes this module starts: never relaunch twice


def accelerate_cpu_single(env: Mapping[str, str]) -> bool:
    """True inside a process that ``accelerate launch --cpu`` started without a process group."""
    use_cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    return use_cpu and "MASTER_ADDR" in env and "RANK" not in env and "WORLD_SIZE" not in env and RELAUNCHED not in env


def requested_processes(launch_cmdline: Sequence[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asked for (flag or config file), or None."""
    args = list(launch_cmdline)
    # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, a in enumerate(args) if a == "launch" or a.endswith("accelerate.commands.launch")
              or os.path.basename(a).startswith("accelerate-launch")]
    if not starts:
        return None
    args = args[starts[0] + 1:]
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed, _ = launch_command_parser().parse_known_args(args)
    except SystemExit:  # not a command line accelerate itself would have accepted
        return None
    if parsed.num_processes is not None:
        return int(parsed.num_processes)
    if parsed.config_file:
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            return int(load_config_from_file(parsed.config_file).num_processes)
        except (OSError, ValueError, TypeError):
            return None
    return None


def _parent_cmdline() -> list[str]:
    try:
        import psutil

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 - no parent to read (exited, no permission): treat as unknown
        return []


def relaunch_if_needed(argv: Sequence[str], echo=print) -> int | None:
    """Start the processes ``accelerate launch --cpu`` did not, and return their exit code;
    None when this process should simply run (anything other than that launcher situation)."""
    if not accelerate_cpu_single(os.environ):
        return None
    n = requested_processes(_parent_cmdline())
    if n is None:
        echo("ctrltok: started by `accelerate launch --cpu` without a process group and the process count is "
             "unknown: training in this one process (use `torchrun --nproc_per_node N -m ctrltok train ...`)")
        return None
    if n <= 1:
        return None
    env = {**os.environ, RELAUNCHED: "1"}
    echo(f"ctrltok: `accelerate launch --cpu` started one process for the {n} asked for (it needs mpirun for "
         f"more); starting {n} through torch.distributed.run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", env["MASTER_ADDR"], "--master_port", env.get("MASTER_PORT", "29500"),
           "-m", "ctrltok", *argv]
    return subprocess.run(cmd, env=env).returncode
