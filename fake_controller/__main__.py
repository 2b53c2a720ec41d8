"""`python -m fake_controller`: serve the fake controller and show what each VM does."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import trio

from fake_controller.controller import FakeController, Settings, serving_unavailable
from fake_controller.faults import FaultPlan


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m fake_controller",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
A controller for MIGlet that does what the seed's sample controller does: it acknowledges vm_started
and sends each ready VM one register_runner command (polls may be held with ?wait=N).

admin API:
  GET  /_admin/vms                      the VMs, their state and events
  GET  /_admin/requests                 every request received
  POST /_admin/vms/{vm_id}/commands     queue a command, e.g. {"type": "shutdown"}
  PUT  /_admin/faults                   replace the fault plan (JSON, fields as the flags below)""",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [%(default)s]")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on, 0 for any [%(default)s]")
    parser.add_argument("--runner-url", default=defaults.runner_url, help="runner_url to hand out [%(default)s]")
    parser.add_argument("--runner-group", default=defaults.runner_group, help="runner_group [%(default)s]")
    parser.add_argument("--labels", default=",".join(defaults.labels), help="comma-separated labels [%(default)s]")
    parser.add_argument(
        "--registration-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds after vm_started before the register_runner command exists [%(default)s]",
    )
    parser.add_argument(
        "--token-ttl", type=float, default=defaults.token_ttl_s, metavar="SECONDS", help="token lifetime [%(default)s]"
    )
    parser.add_argument(
        "--no-long-poll", action="store_true", help="answer polls at once, ignoring ?wait=N (the seed's behaviour)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print what each VM does")
    faults = parser.add_argument_group("fault injection (rates are probabilities per request)")
    faults.add_argument("--error-rate", type=float, default=0.0, help="answer with an error status [%(default)s]")
    faults.add_argument(
        "--error-status", type=int, action="append", metavar="CODE", help="error statuses to use [500,502,503,429,408]"
    )
    faults.add_argument("--retry-after", type=float, metavar="SECONDS", help="Retry-After on 429 and 503")
    faults.add_argument("--malformed-rate", type=float, default=0.0, help="answer 200 with a garbled body")
    faults.add_argument("--drop-rate", type=float, default=0.0, help="drop the connection mid-answer")
    faults.add_argument("--drop-after-rate", type=float, default=0.0, help="process an event, then drop the connection")
    faults.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="random extra delay up to this")
    faults.add_argument("--duplicate-commands", action="store_true", help="deliver every command twice")
    faults.add_argument("--seed", type=int, help="random seed for reproducible faults")
    return parser


def fault_plan(args: argparse.Namespace) -> FaultPlan:
    plan = FaultPlan(
        error_rate=args.error_rate,
        retry_after_s=args.retry_after,
        malformed_rate=args.malformed_rate,
        drop_rate=args.drop_rate,
        drop_after_rate=args.drop_after_rate,
        latency_s=args.latency,
        duplicate_commands=args.duplicate_commands,
        seed=args.seed,
    )
    if args.error_status:
        plan.error_statuses = list(args.error_status)
    return plan


def _show(vm_id: str, what: str, detail: dict[str, Any]) -> None:
    fields = " ".join(f"{key}={value}" for key, value in detail.items() if value not in (None, ""))
    print(f"{vm_id:<20} {what:<20} {fields}", flush=True)


async def _main(args: argparse.Namespace) -> None:
    from fake_controller.server import serve

    settings = Settings(
        runner_url=args.runner_url,
        runner_group=args.runner_group,
        labels=[label for label in args.labels.split(",") if label],
        registration_delay_s=args.registration_delay,
        token_ttl_s=args.token_ttl,
        long_poll=not args.no_long_poll,
    )
    controller = FakeController(settings, observer=None if args.quiet else _show, faults=fault_plan(args))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, controller, args.host, args.port)
        print(f"fake controller listening on {url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if serving_unavailable("fake_controller"):
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
