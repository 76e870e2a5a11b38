"""Run ``protoaudit`` and SIGKILL the process itself at one precise point of training (a real ``kill -9``).

    python tests/kill_at.py POINT MEMBER N -- protoaudit arguments...

POINT is one of:

- ``joint``:   in the N-th joint SGD epoch of MEMBER in this process, after its second batch
- ``push``:    in the N-th push of MEMBER in this process, after its first batch
- ``rename``:  just before MEMBER's ``model.safetensors`` is renamed into place (its temporary is left)
- ``between``: when MEMBER's training starts (every member before it is finished)
- ``hold``:    not a kill: when MEMBER's training starts, create the file $KILL_AT_HOLD/holding and wait until
  $KILL_AT_HOLD/release exists, then go on (a writer that holds its run's lock while a test acts)

The points are reached by wrapping library functions in this process only; protoaudit has no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def kill() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hold(member: str) -> None:
    hold = Path(os.environ["KILL_AT_HOLD"])
    (hold / "holding").write_text(str(os.getpid()))
    while not (hold / "release").exists():
        time.sleep(0.05)


def _counting(real: Any, counts: Counter[str], key: str, target: Any, at_batch: int, n: int) -> Any:
    """``real`` (an iter_batches) wrapped: on the n-th call for which ``target(args)`` holds, kill the
    process once ``at_batch`` batches were yielded."""

    def batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        hit = target(args)
        if hit:
            counts[key] += 1
        for i, batch in enumerate(real(*args, **kwargs)):
            if hit and counts[key] == n and i == at_batch:
                kill()
            yield batch

    return batches


def install(point: str, member: str, n: int) -> None:
    import protoaudit.engine.ensemble as ensemble
    import protoaudit.engine.push as push
    import protoaudit.engine.train as train

    state: dict[str, Any] = {"member": None, "stage": None}
    counts: Counter[str] = Counter()
    real_train_member, real_set_stage, real_replace = ensemble.train_member, train.set_stage, os.replace

    def train_member(spec: Any, *args: Any, **kwargs: Any) -> Any:
        state["member"] = spec.name
        if point == "between" and spec.name == member:
            kill()
        if point == "hold" and spec.name == member:
            _hold(member)
        return real_train_member(spec, *args, **kwargs)

    def set_stage(model: Any, stage: str) -> None:
        state["stage"] = stage
        real_set_stage(model, stage)

    def in_joint(args: tuple[Any, ...]) -> bool:  # the SGD epochs pass the augmentation generator
        sgd = len(args) >= 6 and args[5] is not None
        return point == "joint" and sgd and state["member"] == member and state["stage"] == "joint"

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if point == "rename" and str(dst).endswith(os.path.join("members", member, "model.safetensors")):
            kill()
        real_replace(src, dst, *args, **kwargs)

    ensemble.train_member = train_member
    train.set_stage = set_stage
    train.iter_batches = _counting(train.iter_batches, counts, "joint", in_joint, 2, n)
    push.iter_batches = _counting(
        push.iter_batches, counts, "push", lambda _: point == "push" and state["member"] == member, 1, n
    )
    os.replace = replace


def main() -> None:
    point, member, n, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: kill_at.py POINT MEMBER N -- ARGS..."
    install(point, member, int(n))
    from protoaudit.cli import main as cli

    cli(args)
    sys.exit(f"kill_at.py: the run ended before reaching {point} {member} {n}")


if __name__ == "__main__":
    main()
