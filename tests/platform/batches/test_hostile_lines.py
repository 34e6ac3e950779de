"""Hostile batch lines. JSON beyond the bounded loader's limits is a 400 at upload that names
the line, as any line that cannot parse is (and a file stored before that check fails its
batch cleanly); values that parse but are hostile fail their own line with a 4xx in the
error file, while the batch's other lines and another tenant's requests complete as usual."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from sqlalchemy import update

from loramux.db.models import File
from tests.platform.adapters.helpers import assert_openai_error
from tests.platform.batches.conftest import bearer, jsonl, request_line, upload
from tests.platform.batches.test_runner import COMPLETION, model_of, output_lines, stable

GOOD = request_line("a", {"model": "m", "prompt": "hi"})
PREFIX = b'{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": '
HOSTILE_JSON = {
    "deep": (
        PREFIX + b'{"model": "m", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        "nested deeper than",
    ),
    "long integer": (
        PREFIX + b'{"model": "m", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}}",
        "more than 40 digits",
    ),
    "NaN": (PREFIX + b'{"model": "m", "prompt": "hi", "temperature": NaN}}', "NaN"),
    "Infinity": (PREFIX + b'{"model": "m", "prompt": "hi", "top_p": -Infinity}}', "Infinity"),
    "huge float": (PREFIX + b'{"model": "m", "prompt": "hi", "top_p": 1e999}}', "out of range"),
    "lone surrogate": (PREFIX + b'{"model": "m", "prompt": "hi \\ud800"}}', "surrogate"),
    "not UTF-8": (PREFIX + b'{"model": "m", "prompt": "hi \xed\xa0\x80"}}', "UTF-8"),
}


def test_json_beyond_the_limits_is_a_400_naming_the_line(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    for name, (line, reason) in HOSTILE_JSON.items():
        response = upload(client, key, jsonl([GOOD]) + line + b"\n")
        error = assert_openai_error(response, 400, "invalid_batch_line")
        assert error["message"].startswith("line 2: "), (name, error)
        assert reason in error["message"], (name, error)
        assert error["param"] == "file"
    assert client.get("/v1/files", headers=bearer(key)).json()["data"] == []


def test_a_stored_file_beyond_the_limits_fails_its_batch_cleanly(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, app_state, db
) -> None:
    """A file stored before uploads were checked this way: the runner refuses it, by line."""
    _, key = make_tenant("acme")
    batch = start_batch(key, [GOOD])
    data = jsonl([GOOD]) + HOSTILE_JSON["deep"][0] + b"\n"
    sha256 = hashlib.sha256(data).hexdigest()
    file_id = batch["input_file_id"]
    with db.begin() as session:
        row = session.get(File, file_id)
        assert row is not None
        app_state.storage.put(row.storage_key, data, sha256=sha256)
        session.execute(
            update(File).where(File.id == file_id).values(sha256=sha256, bytes=len(data))
        )
    assert run_batch(batch["id"]) == "failed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=bearer(key)).json()
    [error] = done["errors"]["data"]
    assert error["code"] == "invalid_batch_line"
    assert error["message"].startswith("line 2: JSON nested deeper than")


def hostile_bodies(model: str) -> dict[str, dict[str, Any]]:
    """Bodies within the JSON limits whose values are hostile to whoever runs them."""
    nested: Any = "x"
    for _ in range(60):
        nested = [nested]
    return {
        "tiny-temperature": {"model": model, **COMPLETION, "temperature": 1e-45, "seed": 7},
        "tiny-top-p": {"model": model, **COMPLETION, "temperature": 1.0, "top_p": 1e-300},
        "huge-seed": {"model": model, **COMPLETION, "seed": 10**39},
        "huge-max-tokens": {"model": model, **COMPLETION, "max_tokens": 10**39},
        "huge-n": {"model": model, **COMPLETION, "n": 10**39},
        "huge-token-id": {"model": model, **COMPLETION, "prompt": [1, 10**39]},
        "negative-token-id": {"model": model, **COMPLETION, "prompt": [1, -5]},
        "nested-stop": {"model": model, **COMPLETION, "stop": nested},
        "nested-prompt": {"model": model, **COMPLETION, "prompt": nested},
        "huge-logprobs": {"model": model, **COMPLETION, "logprobs": 10**39},
    }


def test_hostile_values_fail_their_own_line_only(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch
) -> None:
    _, key = make_tenant("acme")
    _, other = make_tenant("bystander")
    model = model_of(client, key)
    good = {"model": model, **COMPLETION}
    bystander = {"model": model_of(client, other), **COMPLETION, "prompt": "The sea"}
    alone = client.post("/v1/completions", headers=bearer(other), json=bystander).json()
    hostile = hostile_bodies(model)
    lines = [request_line("good-first", good)]
    lines += [request_line(name, body) for name, body in hostile.items()]
    lines += [request_line("good-last", good)]
    batch_id = start_batch(key, lines)["id"]

    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_batch(batch_id, batch_max_in_flight=3))
    )
    runner.start()
    beside = []  # another tenant's requests while the batch runs
    while not beside or (runner.is_alive() and len(beside) < 20):
        response = client.post("/v1/completions", headers=bearer(other), json=bystander)
        assert response.status_code == 200, response.text
        beside.append(response.json())
    runner.join()
    assert outcome == ["completed"]
    for response in beside:
        assert response["choices"] == alone["choices"] and response["usage"] == alone["usage"]

    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    results = {
        line["custom_id"]: line
        for file_id in (done["output_file_id"], done["error_file_id"])
        for line in output_lines(client, key, file_id)
    }
    assert sorted(results) == sorted(line["custom_id"] for line in lines)
    online = client.post("/v1/completions", headers=bearer(key), json=good).json()
    for name in ("good-first", "good-last"):
        assert results[name]["response"]["status_code"] == 200
        assert stable(results[name]["response"]["body"]) == stable(online)
    for name in hostile:
        response = results[name]["response"]
        if name.startswith("tiny-"):  # valid values the engine must survive: run, or refused
            assert response["status_code"] in (200, 400), (name, results[name])
        else:
            assert response["status_code"] == 400, (name, results[name])
        if response["status_code"] != 200:
            error = response["body"]["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and error["message"], (name, error)
            assert results[name]["error"]["message"] == error["message"]
    json.dumps(list(results.values()), allow_nan=False)  # the files hold only strict JSON
