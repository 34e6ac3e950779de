"""The ingress deployment: the loramux Starlette app, stateless, engine over a Serve handle.

Everything the API does (auth, limits, quotas, resolution, usage, adapters, batches, the
console) runs here as in ``loramux serve``; only the engine is elsewhere, reached through
``RayEngineClient``. Rate limits are shared between ingress replicas through Redis
(``LORAMUX_REDIS_URL``); without it each replica counts on its own.
"""

from __future__ import annotations

from typing import Any, cast

from ray import serve
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from loramux.app import build_state, create_app
from loramux.ray_engine import RayEngineClient
from loramux.ray_serve.config import settings_from_payload


@serve.ingress()
class ApiIngress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, engine: DeploymentHandle, settings: dict[str, Any] | None = None
    ):
        self.settings = settings_from_payload(settings)
        self.engine = RayEngineClient.from_settings(self.settings, engine)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app_state = build_state(self.settings, engine=self.engine)
        return create_app(self.settings, app_state=app_state)


IngressDeployment = cast(Deployment, serve.deployment(ApiIngress))
