"""What the receiver runs beside the upload path, wired in one place: /metrics on the admin app
(and on a listener of its own if configured), the retention pass, the webhook alerts."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec_tools.receiver import metrics, retention
from dualrec_tools.receiver.alerts import Alerter
from dualrec_tools.receiver.guard import Guard
from dualrec_tools.receiver.ratelog import RateLimitedLog
from dualrec_tools.receiver.storage import Storage

if TYPE_CHECKING:
    from dualrec_tools.receiver.runtime import ReceiverConfig

METRICS = web.AppKey("metrics_source", tuple)


async def get_metrics(request: web.Request) -> web.Response:
    store, guard = request.app[METRICS]
    body = await asyncio.to_thread(metrics.render, store, guard)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def metrics_app(admin_app: web.Application) -> web.Application:
    app = web.Application()
    app[METRICS] = admin_app[METRICS]
    app.router.add_get("/metrics", get_metrics)
    return app


def install(admin_app: web.Application, store: Storage, guard: Guard, config: ReceiverConfig,
            events: RateLimitedLog, receipt_key: Ed25519PrivateKey
            ) -> list[Coroutine[Any, Any, None]]:
    """Add /metrics and the admin retention routes to admin_app; return the background
    coroutines to run for as long as the receiver runs."""
    admin_app[METRICS] = (store, guard)
    admin_app.router.add_get("/metrics", get_metrics)
    retention.add_admin_routes(admin_app, store)
    jobs: list[Coroutine[Any, Any, None]] = []
    if config.alerts is not None:
        jobs.append(Alerter(store, config.alerts, events).run())
    if config.retention is not None:
        log_path = config.data_dir / retention.DELETION_LOG
        jobs.append(retention.Retention(store, config.retention, log_path, receipt_key,
                                        events).run())
    return jobs
