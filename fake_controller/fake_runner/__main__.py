"""CLI: `python -m fake_controller.fake_runner install DIR [--behaviour FILE.json] [--python P] [--owner U]`
and `python -m fake_controller.fake_runner enqueue DIR NAME [--result R] [--duration S] [--leave-behind HOW]`.

`install` builds a fake runner directory for MIGlet's MIGLET_RUNNER_DIR; `enqueue` hands a listening
fake runner a job, as GitHub would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .behaviour import LEAVE_BEHIND_WAYS, RESULTS, BehaviourError, parse_behaviour
from .install import enqueue_job, install


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; exit code 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fake_controller.fake_runner")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="create a fake actions/runner directory")
    inst.add_argument("dir", type=Path)
    inst.add_argument("--behaviour", type=Path, help="behaviour JSON (default: built-in defaults)")
    inst.add_argument("--python", help="interpreter for the listener (default: this one)")
    inst.add_argument("--owner", help="chown the directory to this user")
    enq = sub.add_parser("enqueue", help="queue a job for a running fake runner")
    enq.add_argument("dir", type=Path)
    enq.add_argument("name")
    enq.add_argument("--result", default="Succeeded", choices=RESULTS)
    enq.add_argument("--duration", type=float, default=0.0)
    enq.add_argument(
        "--leave-behind", action="append", default=[], choices=LEAVE_BEHIND_WAYS, help="a process the job leaves behind"
    )
    args = parser.parse_args(argv)

    if args.command == "enqueue":
        print(enqueue_job(args.dir, args.name, args.result, args.duration, leave_behind=tuple(args.leave_behind)))
        return 0
    behaviour = None
    if args.behaviour is not None:
        try:
            behaviour = parse_behaviour(args.behaviour.read_text(encoding="utf-8"), str(args.behaviour))
        except (OSError, BehaviourError) as exc:
            print(f"fake runner: {exc}", file=sys.stderr)
            return 2
    print(install(args.dir, behaviour, python=args.python, owner=args.owner))
    return 0


if __name__ == "__main__":
    sys.exit(main())
