"""DeepSpeed hostfiles from a Slurm node list (for `slurm/train.sbatch` MODE=deepspeed).

    python -m mmpretrain.engine.hostfile "node[01-02]" 8  > hostfile
    node01 slots=8
    node02 slots=8
"""
from __future__ import annotations

import re
import sys

from mmpretrain.engine.dist import expand_nodelist


def hostfile_text(nodelist: str, slots: int) -> str:
    """One `HOST slots=N` line per node of a Slurm node list, in Slurm's order."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty node list: {nodelist!r}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def parse_hostfile(text: str) -> dict[str, int]:
    """`{host: slots}` from hostfile text (comments, blank lines ignored), as DeepSpeed reads it."""
    pool: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ValueError(f"bad hostfile line: {raw!r} (want 'HOST slots=N')")
        if m.group(1) in pool:
            raise ValueError(f"host {m.group(1)} listed twice")
        pool[m.group(1)] = int(m.group(2))
    return pool


def slots_per_node(env: dict[str, str]) -> int:
    """Ranks per node in a Slurm allocation: GPUs per node, else tasks per node, else 1."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "")
        m = re.search(r"(\d+)$", value.split("(")[0])  # "gpu:a100:8" -> 8, "8(x2)" -> 8
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m mmpretrain.engine.hostfile NODELIST [SLOTS]`: print the hostfile."""
    import os

    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m mmpretrain.engine.hostfile NODELIST [SLOTS]", file=sys.stderr)
        return 2
    slots = int(args[1]) if len(args) == 2 else slots_per_node(dict(os.environ))
    sys.stdout.write(hostfile_text(args[0], slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
