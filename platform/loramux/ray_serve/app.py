"""The loramux Serve application: the ingress bound to the engine deployment.

``loramux serve --ray`` deploys ``build_app(settings)``. ``serve run`` / ``serve deploy``
(infra/serve-config.yaml) and a KubeRay RayService import
``loramux.ray_serve.app:app_builder`` instead: settings from the environment the config
gives the replicas (``runtime_env``), or from its ``args``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from loramux.ray_serve.config import engine_options, ingress_options, settings_payload
from loramux.ray_serve.engine import EngineDeployment
from loramux.ray_serve.ingress import IngressDeployment
from loramux.settings import Settings, get_settings


def build_app(settings: Settings, *, pass_settings: bool = True) -> Application:
    """Both deployments, configured from ``settings``.

    With ``pass_settings`` replicas get these settings; without, each reads its own
    environment (a Serve config's ``runtime_env``).
    """
    payload = settings_payload(settings) if pass_settings else None
    engine = EngineDeployment.options(**engine_options(settings)).bind(payload)
    return IngressDeployment.options(**ingress_options(settings)).bind(engine, payload)


def app_builder(args: dict[str, Any]) -> Application:
    """For an import path with ``args``: each one a setting (lower case), over the env."""
    return build_app(Settings(**args) if args else get_settings(), pass_settings=bool(args))
