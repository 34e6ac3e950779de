"""Settings into Ray Serve: deployment names, options and autoscaling, settings for replicas.

Autoscaling is configuration, not code: ongoing requests per engine replica against a
target, between min (0 allowed: scale to zero) and max replicas.
"""

from __future__ import annotations

from typing import Any

from loramux.settings import Settings, get_settings

ENGINE_DEPLOYMENT = "LoramuxEngine"
INGRESS_DEPLOYMENT = "LoramuxIngress"


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings a replica should use: those set here (environment and overrides).

    Left out, a setting takes the replica's own environment or default, so a Serve config
    file's ``runtime_env`` (or a RayService's) still configures replicas it deploys.
    """
    return settings.model_dump(exclude_unset=True)


def settings_from_payload(payload: dict[str, Any] | None) -> Settings:
    return Settings(**payload) if payload else get_settings()


def engine_max_ongoing_requests(settings: Settings) -> int:
    return settings.ray_engine_max_ongoing_requests or settings.engine_max_num_seqs


def engine_options(settings: Settings) -> dict[str, Any]:
    min_replicas = settings.ray_engine_min_replicas
    autoscaling: dict[str, Any] = {
        "min_replicas": min_replicas,
        "initial_replicas": min_replicas,
        "max_replicas": max(settings.ray_engine_max_replicas, min_replicas, 1),
        "target_ongoing_requests": settings.ray_engine_target_ongoing_requests,
        "upscale_delay_s": settings.ray_engine_upscale_delay_s,
        "downscale_delay_s": settings.ray_engine_downscale_delay_s,
    }
    return {
        "name": ENGINE_DEPLOYMENT,
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": engine_max_ongoing_requests(settings),
        "ray_actor_options": {
            "num_cpus": settings.ray_engine_num_cpus,
            "num_gpus": settings.ray_engine_num_gpus,
        },
        # Loading the base model takes a while on a cold node; Serve's default health
        # check period is fine once it is up.
        "health_check_timeout_s": 60,
    }


def ingress_options(settings: Settings) -> dict[str, Any]:
    return {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": settings.ray_ingress_replicas,
        # Streams stay open for a whole completion; many ride on one ingress replica.
        "max_ongoing_requests": 1000,
        "ray_actor_options": {"num_cpus": settings.ray_ingress_num_cpus},
    }
