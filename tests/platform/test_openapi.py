"""The OpenAPI document matches the app's routes, and its auth claims hold on the live app."""

from __future__ import annotations

from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from loramux.openapi import build_document


def app_operations(client: TestClient) -> set[tuple[str, str]]:
    operations = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Mount):
            continue  # static files of the console
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                operations.add((method.lower(), route.path))
    return operations


def test_every_route_is_documented_and_nothing_else(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document == build_document()
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert documented == app_operations(client)


def test_documented_security_is_enforced(client: TestClient) -> None:
    """Every operation that claims bearer auth answers 401 in the documented error shape."""
    document = build_document()
    for path, operations in document["paths"].items():
        concrete = path.replace("{id}", "x1").replace("{name}", "x1")
        for method, operation in operations.items():
            response = client.request(method.upper(), concrete)
            if "security" in operation:
                assert response.status_code == 401, (method, path, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
            else:
                assert response.status_code in (200, 307), (method, path, response.status_code)
