"""Judging beyond one machine: `dfj judge --engine ray`, on Ray Data (the `ray` extra).

`judge(artifact, source, out, engine=RaySpec(...))` writes the same JSONL file `dfj judge --data/--jsonl
--out` writes locally (one line per input line, in input order, same fields), judged by a pool of Ray
actors that each load the artifact once. See dfj.distributed.raydata.
"""

from __future__ import annotations

from dfj.distributed.spec import JudgeLoad, RaySpec

__all__ = ["JudgeLoad", "RaySpec", "judge"]


def judge(*args, **kwargs):
    """`dfj.distributed.raydata.judge`: see there."""
    from dfj.distributed.raydata import judge as run

    return run(*args, **kwargs)
