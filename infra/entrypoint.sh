#!/bin/sh
# Start the API: verify (or pull) the base model, migrate the registry, then serve.
# Extra arguments go to `loramux serve` (for example `--port 9000`).
set -e
loramux models pull
loramux db upgrade
exec loramux serve --host 0.0.0.0 "$@"
