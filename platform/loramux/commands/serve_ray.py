"""``loramux serve --ray``: the API and the engine as Ray Serve deployments, one command.

Joins the Ray cluster at ``LORAMUX_RAY_ADDRESS`` (or ``RAY_ADDRESS``), or starts a local Ray,
deploys the ingress (the API) and the engine deployment (``loramux.ray_serve``), serves HTTP
on host:port through Serve's proxy, and takes the application down again on Ctrl-C or
SIGTERM (a local Ray with it). ``serve deploy infra/serve-config.yaml`` deploys the same
application and leaves it running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from types import FrameType

from loramux.settings import Settings


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve_on_ray(settings: Settings) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --ray needs Ray Serve: pip install 'loramux[ray]'", file=sys.stderr)
        return 1
    from loramux.ray_serve.app import build_app

    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    started = time.monotonic()
    ray.init(address=address)
    worker = None
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings), name=settings.ray_app_name, route_prefix="/")
        print(
            f"loramux on Ray Serve: http://{settings.host}:{settings.port} "
            f"(ready in {time.monotonic() - started:.1f} s; engine replicas "
            f"{settings.ray_engine_min_replicas} to {settings.ray_engine_max_replicas})",
            flush=True,
        )
        if settings.broker_url is None:
            # The embedded worker on the SQLite broker; its batches reach the engine through
            # this app's internal engine routes, so through the same Ray client.
            from loramux.jobs.embedded import EmbeddedWorker

            worker = EmbeddedWorker(settings)
            worker.start()
        signal.signal(signal.SIGTERM, _stop)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            worker.stop()
        with contextlib.suppress(Exception):  # it may never have been deployed
            serve.delete(settings.ray_app_name)
        if not address:  # the local Ray this command started
            serve.shutdown()
            ray.shutdown()
    return 0
