"""Serving the fake controller over real HTTP with hypercorn's trio worker."""

from __future__ import annotations

import logging
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from fake_controller.controller import FakeController
from fake_controller.metadata import FakeMetadata


async def serve(
    controller: FakeController | FakeMetadata,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `controller` (or a fake metadata service) until cancelled; `nursery.start(serve, ...)` returns the
    base URL (port 0 picks one).

    With `certfile` and `keyfile` it serves HTTPS.
    """
    config = HypercornConfig()
    config.certfile = certfile
    config.keyfile = keyfile
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("fake_controller.hypercorn")
    config.graceful_timeout = 0.5
    # Many agents connect at once (a fleet starting): the default backlog of 100 would reset connections.
    config.backlog = 4096
    config.keep_alive_timeout = 75.0

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn_serve, controller, config))  # type: ignore[arg-type]
        task_status.started(binds[0])
