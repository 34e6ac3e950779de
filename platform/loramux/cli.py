"""The ``loramux`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

Handler = Callable[[argparse.Namespace], int]


def _lazy(target: str) -> Handler:
    """Import ``module:function`` only when its command runs, so ``--help`` stays fast."""
    module_name, func_name = target.split(":")

    def handler(args: argparse.Namespace) -> int:
        return int(getattr(import_module(module_name), func_name)(args) or 0)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the API on HOST:PORT")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--demo", action="store_true", help="print fresh admin and demo keys")
    serve.set_defaults(handler=_lazy("loramux.commands.serve:main"))

    db = commands.add_parser("db", help="registry schema").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="apply migrations up to head").set_defaults(
        handler=_lazy("loramux.commands.admin:db_upgrade")
    )

    models = commands.add_parser("models", help="base models").add_subparsers(
        dest="models", required=True
    )
    pull = models.add_parser("pull", help="fetch and convert a base model")
    pull.add_argument("name", nargs="?", default=None)
    pull.set_defaults(handler=_lazy("loramux.base_models:cli_pull"))
    models.add_parser("list", help="known and pulled models").set_defaults(
        handler=_lazy("loramux.base_models:cli_list")
    )

    tenants = commands.add_parser("tenants", help="tenants").add_subparsers(
        dest="tenants", required=True
    )
    tcreate = tenants.add_parser("create", help="create a tenant")
    tcreate.add_argument("name")
    tcreate.add_argument("--json", action="store_true")
    tcreate.set_defaults(handler=_lazy("loramux.commands.admin:tenants_create"))

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    kcreate = keys.add_parser("create", help="create a key (the secret is printed once)")
    kcreate.add_argument("--tenant", required=True)
    kcreate.add_argument("--name", default="default")
    kcreate.add_argument("--scopes", nargs="+", default=None)
    kcreate.add_argument("--json", action="store_true")
    kcreate.set_defaults(handler=_lazy("loramux.commands.admin:keys_create"))
    krevoke = keys.add_parser("revoke", help="revoke a key by id")
    krevoke.add_argument("id")
    krevoke.set_defaults(handler=_lazy("loramux.commands.admin:keys_revoke"))

    adapters = commands.add_parser("adapters", help="adapters").add_subparsers(
        dest="adapters", required=True
    )
    push = adapters.add_parser("push", help="upload a PEFT adapter directory")
    push.add_argument("dir")
    push.add_argument("--name", required=True)
    push.add_argument("--no-wait", action="store_true")
    push.set_defaults(handler=_lazy("loramux.commands.adapters:push"))

    batches = commands.add_parser("batches", help="batch jobs").add_subparsers(
        dest="batches", required=True
    )
    bcreate = batches.add_parser("create", help="upload a JSONL file and start a batch")
    bcreate.add_argument("file")
    bcreate.add_argument("--endpoint", default=None, help="default: the first line's url")
    bcreate.add_argument("--wait", action="store_true", help="show progress until it ends")
    bcreate.add_argument("--output", default=None, help="with --wait, save the output here")
    bcreate.add_argument("--json", action="store_true")
    bcreate.set_defaults(handler=_lazy("loramux.commands.batches:create"))
    bget = batches.add_parser("get", help="show a batch")
    bget.add_argument("id")
    bget.add_argument("--json", action="store_true")
    bget.set_defaults(handler=_lazy("loramux.commands.batches:get"))

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    for kind in ("engine", "lora", "api"):
        b = bench.add_parser(kind, help=f"{kind} benchmark")
        b.add_argument("--json", dest="json_path", default=None, help="write results here")
        b.add_argument("--model", default=None, help="model name or directory")
        b.add_argument("--quick", action="store_true", help="a smaller workload")
        b.set_defaults(handler=_lazy(f"loramux.bench.{kind}:main"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
