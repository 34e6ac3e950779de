"""The config is resolved against the base model at upload: refused at once, or stored resolved.

Module name patterns are tenant regular expressions; they are matched by the engine's
bounded matcher against the base model's module names, never run by ``re``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.db.models import AdapterVersion
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, assert_openai_error, bearer, upload
from tests.platform.adapters.test_bad_uploads import nothing_stored  # noqa: F401 - a fixture

# The tiny base model of the adapter tests has 4 layers.
MODULES = [
    f"model.layers.{layer}.{module}"
    for layer in range(4)
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
EVIL = "(" * 10 + "a*" + ")*" * 10 + "$"

REFUSED_AT_ONCE: list[tuple[dict[str, Any], str]] = [
    ({"use_dora": True}, "DoRA (use_dora) is not supported"),
    ({"target_modules": ["lm_head"]}, "LoRA on embeddings or lm_head is not supported"),
    ({"target_modules": EVIL}, "target_modules match none of the base model's projections"),
    ({"target_modules": "(?=q).*_proj"}, "target_modules '(?=q).*_proj' is refused"),
    ({"target_modules": r"(\w+)\1"}, "escape \\1 is not supported"),
    ({"exclude_modules": "(?i)Q_PROJ"}, "exclude_modules '(?i)Q_PROJ' is refused"),
    ({"rank_pattern": {"(x+x+)+y(?#c)": 4}}, "rank_pattern key"),
    ({"alpha_pattern": {"q_proj*+": 4}}, "possessive quantifiers"),
    ({"alpha_pattern": {"(q_proj": 4}}, "is not a valid regular expression"),
    (
        {"layers_to_transform": [0], "layers_pattern": "(a|aa)+$"},
        "layers_pattern must name the model's list of layers",
    ),
    (
        {"target_modules": "all-linear", "rank_pattern": {f".*z.*|{i}": 4 for i in range(400)}},
        "take too much work",
    ),
]


def _config(adapter_dir: Path, **changes: Any) -> bytes:
    return json.dumps(json.loads((adapter_dir / CONFIG).read_bytes()) | changes).encode()


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(("changes", "needle"), REFUSED_AT_ONCE, ids=range(len(REFUSED_AT_ONCE)))
def test_configs_that_do_not_resolve_are_refused_at_once(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, changes, needle
) -> None:
    _, secret = make_tenant("acme")
    response = upload(
        client, secret, "bot", peft_adapter_dir, config=_config(peft_adapter_dir, **changes)
    )
    error = assert_openai_error(response, 400, "invalid_adapter")
    assert needle in error["message"], error
    assert error["param"] == "config"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested deeper than"),
        (b'{"peft_type": "LORA", "r": ' + b"9" * 5_000 + b"}", "more than 40 digits"),
        (b'{"peft_type": "LORA", "lora_alpha": NaN}', "NaN is not a JSON value"),
    ],
)
@pytest.mark.usefixtures("nothing_stored")
def test_json_past_the_limits_is_a_400_not_a_500(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, raw, needle
) -> None:
    _, secret = make_tenant("acme")
    error = assert_openai_error(upload(client, secret, "bot", peft_adapter_dir, config=raw), 400)
    assert "not valid JSON" in error["message"] and needle in error["message"], error


@pytest.mark.usefixtures("nothing_stored")
def test_presigned_create_refuses_dora_at_once(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir
) -> None:
    _, secret = make_tenant("acme")
    weights = (peft_adapter_dir / WEIGHTS).read_bytes()
    response = client.post(
        "/v1/adapters/uploads",
        json={
            "name": "dora-bot",
            "config": json.loads(_config(peft_adapter_dir, use_dora=True)),
            "weights_bytes": len(weights),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        },
        headers=bearer(secret),
    )
    error = assert_openai_error(response, 400, "invalid_adapter")
    assert "DoRA" in error["message"]


def test_a_pattern_is_stored_as_the_modules_it_resolved_to(  # type: ignore[no-untyped-def]
    client: TestClient,
    make_tenant,
    peft_adapter_dir: Path,
    wait_validated,
    db: sessionmaker[Session],
) -> None:
    """Nested stars (catastrophic for re on these very names) resolve in bounded work; the
    version holds the resolved modules from the upload on."""
    _, secret = make_tenant("acme")
    pattern = r"((.*)*)*\.(q|v|down)_proj"
    config = _config(peft_adapter_dir, target_modules=pattern)
    response = upload(client, secret, "pattern-bot", peft_adapter_dir, config=config)
    assert response.status_code == 201, response.text
    # re itself would backtrack for ages on this pattern; the same language, without nesting:
    expected = [module for module in MODULES if re.fullmatch(r".*\.(q|v|down)_proj", module)]
    assert len(expected) == 12
    assert response.json()["target_modules"] == expected
    assert wait_validated(response.json()["version_id"]).status == "ready"
    with db() as session:
        version = session.scalars(select(AdapterVersion)).one()
    assert version.target_modules == expected
    shown = client.get("/v1/adapters/pattern-bot", headers=bearer(secret)).json()
    assert shown["target_modules"] == expected and shown["rank"] == 8
