"""The ``loramux`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import TYPE_CHECKING

from loramux import __version__
from loramux.auth.keys import SCOPES, TENANT_DEFAULT_SCOPES
from loramux.commands.output import CommandFailed

if TYPE_CHECKING:
    Group = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = (
    "Multi-tenant LoRA serving. Tenant commands (adapters, batches) use the HTTP API at "
    "LORAMUX_BASE_URL with LORAMUX_API_KEY; registry commands (db, tenants, keys) use the "
    "registry directly (LORAMUX_DATABASE_URL, or the embedded one under LORAMUX_HOME)."
)
JSON_HELP = "print JSON for scripts instead of text for people"
TENANT_SCOPES = sorted(SCOPES - {"admin"})


def _lazy(target: str) -> Handler:
    """Import ``module:function`` only when its command runs, so ``--help`` stays fast."""
    module_name, func_name = target.split(":")

    def handler(args: argparse.Namespace) -> int:
        return int(getattr(import_module(module_name), func_name)(args) or 0)

    return handler


def _group(commands: Group, name: str, help: str) -> Group:
    parser = commands.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=name, required=True, metavar="COMMAND")


def _command(
    group: Group, name: str, help: str, target: str, *, json: bool = False
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=_lazy(target))
    if json:
        parser.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser


def _add_server_commands(commands: Group) -> None:
    serve = commands.add_parser("serve", help="serve the API", description="serve the API")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
    serve.add_argument("--demo", action="store_true", help="print fresh admin and demo keys")
    serve.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve (RAY_ADDRESS, or a local Ray): the API and autoscaled engine "
        "replicas (needs pip install 'loramux[ray]')",
    )
    serve.set_defaults(handler=_lazy("loramux.commands.serve:main"))

    db = _group(commands, "db", "the registry's schema")
    _command(db, "upgrade", "apply migrations up to head", "loramux.commands.admin:db_upgrade")

    models = _group(commands, "models", "base models")
    pull = _command(
        models, "pull", "fetch and convert a base model", "loramux.base_models:cli_pull"
    )
    pull.add_argument("name", nargs="?", default=None, help="a name from `loramux models list`")
    _command(models, "list", "known and pulled models", "loramux.base_models:cli_list")

    bench = _group(commands, "bench", "benchmarks")
    for kind in ("engine", "lora", "api", "scale", "spec", "quant"):
        b = _command(bench, kind, f"{kind} benchmark", f"loramux.bench.{kind}:main")
        b.add_argument("--json", dest="json_path", default=None, help="write results here")
        b.add_argument("--model", default=None, help="model name or directory")
        b.add_argument("--quick", action="store_true", help="a smaller workload")
        if kind == "engine":
            b.add_argument(
                "--contend",
                type=int,
                default=0,
                metavar="N",
                help="run again beside N one-core busy loops (a shared host)",
            )
    gpu = _command(
        bench,
        "gpu",
        "the engine on a GPU against transformers, PEFT and the memory bandwidth bound, "
        "on random-weight models it makes (no download)",
        "loramux.bench.gpu:main",
    )
    gpu.add_argument("--json", dest="json_path", default=None, help="write results here")
    gpu.add_argument(
        "--quick", action="store_true", help="each shape cut to 2 layers, a smaller workload"
    )
    gpu.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="cpu: a dry run on SmolLM2-135M's shape only (default: cuda when there is one)",
    )
    gpu.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="SHAPE",
        help="smollm2-135m, llama3-8b (CUDA only); default: both",
    )
    gpu.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        metavar="BYTES_PER_S",
        help="memory bandwidth of the decode bound (default: 4.8e12, an H200's HBM, on CUDA; "
        "a measured tensor copy on a CPU)",
    )


def _add_registry_commands(commands: Group) -> None:
    admin = "loramux.commands.admin"
    tenants = _group(commands, "tenants", "tenants (straight in the registry)")
    tcreate = _command(tenants, "create", "create a tenant", f"{admin}:tenants_create", json=True)
    tcreate.add_argument("name", help="letters, digits, '_', '-' and '.'")
    tcreate.add_argument(
        "--if-not-exists",
        action="store_true",
        help="succeed, changing nothing, when a tenant of that name exists",
    )
    _command(tenants, "list", "list tenants", f"{admin}:tenants_list", json=True)

    keys = _group(commands, "keys", "API keys (straight in the registry)")
    kcreate = _command(
        keys,
        "create",
        "create a key (its secret is printed once)",
        f"{admin}:keys_create",
        json=True,
    )
    kcreate.add_argument("--tenant", required=True, help="the tenant's name or id")
    kcreate.add_argument("--name", default="default", help="a label for the key")
    kcreate.add_argument(
        "--scopes",
        nargs="+",
        default=None,
        metavar="SCOPE",
        help=f"what the key may do, any of: {', '.join(TENANT_SCOPES)} "
        f"(default: all of {', '.join(TENANT_DEFAULT_SCOPES)})",
    )
    klist = _command(
        keys, "list", "list keys (never their secrets)", f"{admin}:keys_list", json=True
    )
    klist.add_argument("--tenant", default=None, help="only this tenant's keys (name or id)")
    krevoke = _command(
        keys,
        "revoke",
        "revoke a key by id, or a tenant's keys by name (--tenant and --name)",
        f"{admin}:keys_revoke",
    )
    krevoke.add_argument("id", nargs="?", default=None, help="the key's id (`loramux keys list`)")
    krevoke.add_argument("--tenant", default=None, help="with --name: the tenant's name or id")
    krevoke.add_argument("--name", default=None, help="with --tenant: revoke its keys of this name")


def _add_tenant_commands(commands: Group) -> None:
    target = "loramux.commands.adapters"
    adapters = _group(commands, "adapters", "your adapters (LORAMUX_BASE_URL, LORAMUX_API_KEY)")
    push = _command(
        adapters, "push", "upload a PEFT adapter directory", f"{target}:push", json=True
    )
    push.add_argument("dir", help="the directory PEFT's save_pretrained wrote")
    push.add_argument("--name", required=True, help="the adapter's name, used as `model`")
    push.add_argument("--no-wait", action="store_true", help="do not wait for validation")
    _command(adapters, "list", "list adapters", f"{target}:list_adapters", json=True)
    aget = _command(adapters, "get", "show an adapter and its versions", f"{target}:get", json=True)
    aget.add_argument("name", help="the adapter's name")
    adelete = _command(adapters, "delete", "delete an adapter", f"{target}:delete", json=True)
    adelete.add_argument("name", help="the adapter's name")

    target = "loramux.commands.batches"
    batches = _group(commands, "batches", "batch jobs (LORAMUX_BASE_URL, LORAMUX_API_KEY)")
    create = _command(
        batches, "create", "upload a JSONL file and start a batch", f"{target}:create", json=True
    )
    create.add_argument("file", help="requests, one JSON object per line (OpenAI's batch input)")
    create.add_argument("--endpoint", default=None, help="default: the first line's url")
    create.add_argument(
        "--wait", action="store_true", help="show progress until it ends; exit 1 if any failed"
    )
    create.add_argument("--output", default=None, help="with --wait, save the output here")
    create.add_argument(
        "--errors",
        default=None,
        help="with --wait, save failed requests' errors here (default: BATCH_ID_errors.jsonl)",
    )
    create.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the batch's id (for BATCH=$(loramux batches create ... --quiet))",
    )
    bget = _command(batches, "get", "show a batch", f"{target}:get", json=True)
    bget.add_argument("id", help="the batch's id")
    blist = _command(batches, "list", "list batches", f"{target}:list_batches", json=True)
    blist.add_argument("--limit", type=int, default=20, help="at most this many (1 to 100)")
    blist.add_argument("--after", default=None, help="the batches after this id")
    bcancel = _command(batches, "cancel", "cancel a batch", f"{target}:cancel", json=True)
    bcancel.add_argument("id", help="the batch's id")
    download = _command(
        batches, "download", "save a batch's output and error files", f"{target}:download"
    )
    download.add_argument("id", help="the batch's id")
    download.add_argument("--output", default=None, help="save the output file here ('-': stdout)")
    download.add_argument("--errors", default=None, help="save the error file here ('-': stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_server_commands(commands)
    _add_registry_commands(commands)
    _add_tenant_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
