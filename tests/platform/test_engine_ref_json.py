"""The AdapterRef survives the remote engine's JSON, namespace included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loramux.api.engine import _adapter
from loramux.errors import InvalidRequest
from loramux.remote_engine import _ref_json
from loramux_engine.lora.ref import AdapterRef

SHA = "ab" * 32


def test_the_ref_round_trips_with_its_namespace() -> None:
    ref = AdapterRef("adv_1", SHA, "tenant-1")
    assert _adapter(json.loads(json.dumps(_ref_json(ref)))) == ref
    assert _adapter({"id": "adv_1", "sha256": SHA}) == AdapterRef("adv_1", SHA)  # no namespace


@pytest.mark.parametrize(
    "value",
    [
        ["adv_1", SHA],
        {"id": "adv_1"},
        {"id": "adv_1", "sha256": "../../etc/passwd"},
        {"id": "adv_1", "sha256": SHA, "namespace": 5},
        {"id": "adv_1", "sha256": SHA, "namespace": "x" * 1000},
    ],
)
def test_a_malformed_ref_is_a_400(value: Any) -> None:
    with pytest.raises(InvalidRequest):
        _adapter(value)
