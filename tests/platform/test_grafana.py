"""The Grafana dashboard in infra/: every query names metrics a live app's /metrics serves,
and compose provisions Grafana with it on the Prometheus that scrapes loramux."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.settings import Settings
from tests.platform.conftest import ADMIN_KEY
from tests.platform.test_telemetry import make_tenant, tiny_engine

INFRA = Path(__file__).resolve().parents[2] / "infra"
GRAFANA = INFRA / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "loramux.json"
NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: every name that is not a function
    call, once strings, label matchers, ranges and by/without label lists are removed."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
    names = set()
    for match in NAME.finditer(bare):
        if not bare[match.end() :].lstrip().startswith("("):
            names.add(match.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(loramux:ttft_bucket{job="x"}[5m]))) '
        "/ sum without (instance) (loramux:running)"
    )
    assert metric_names(expr) == {"loramux:ttft_bucket", "loramux:running"}


@pytest.fixture
def served_metrics(
    pg_database: str, pg_engine: Any, tiny_llama_dir: Path, tmp_path: Path
) -> set[str]:
    """Series names on /metrics of a live app (the tiny model's engine, an adapter cache)
    after one finished request."""
    settings = Settings(
        home=tmp_path / "home", database_url=pg_database,
        storage_url=(tmp_path / "storage").as_uri(), admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
    )  # fmt: skip
    engine = tiny_engine(tiny_llama_dir, tmp_path / "storage")
    app = create_app(settings, app_state=build_state(settings, engine=engine))
    with TestClient(app) as client:
        key = make_tenant(client)
        body = {"model": app.state.loramux.base_model_id, "prompt": "hi", "max_tokens": 2}
        done = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert done.status_code == 200, done.text
        scrape = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert scrape.status_code == 200
    return {
        line.split("{")[0].split(" ")[0]
        for line in scrape.text.splitlines()
        if line and not line.startswith("#")
    }


def test_every_dashboard_query_names_served_metrics(served_metrics: set[str]) -> None:
    exprs = queries()
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= served_metrics, f"{expr!r} names {names - served_metrics}, not served"
        used |= names
    # The dashboard covers what the issue asks an operator to see.
    for needed in (
        "loramux:time_to_first_token_seconds_bucket",
        "loramux:requests_total",
        "loramux:kv_cache_blocks_used",
        "loramux:kv_cache_blocks_total",
        "loramux:prefix_cache_hits_total",
        "loramux:num_preemptions_total",
        "loramux:adapter_cache_device_hits",
        "loramux:adapter_cache_device_misses",
        "loramux:adapter_cache_host_loads",
        "loramux:adapter_cache_disk_evictions",
    ):
        assert needed in used


def test_dashboard_layout_and_datasource() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    datasource = yaml_file(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    [source] = datasource["datasources"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"]
            assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
    assert board["timezone"] == "utc"


def yaml_file(path: Path) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def test_compose_provisions_grafana_on_prometheus() -> None:
    compose = yaml_file(INFRA / "compose.yaml")
    services = compose["services"]
    grafana = services["grafana"]
    assert "prometheus" in grafana["depends_on"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml_file(GRAFANA / "provisioning" / "dashboards" / "loramux.yaml")
    [dashboards] = provider["providers"]
    # The provider reads the folder compose mounts the dashboard JSON into.
    assert mounts["./grafana/dashboards"] == dashboards["options"]["path"]
    assert (INFRA / "grafana" / "dashboards" / DASHBOARD.name).is_file()
    # Grafana reaches Prometheus by its service name on the port Prometheus publishes.
    [source] = yaml_file(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in services and f"{port}:{port}" in services[host]["ports"]
    # And that Prometheus scrapes loramux's /metrics.
    [job] = yaml_file(INFRA / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]
