#!/usr/bin/env bash
# Set up and run the whole test suite: every tox environment (unit + process, integration
# against a real local RabbitMQ, lint, type, entry point). Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.venv-tools
if [ ! -x "$TOOLS/bin/tox" ]; then
  echo "test: installing tox into $TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --upgrade pip
  "$TOOLS/bin/pip" install -q tox
fi

scripts/broker.sh
exec "$TOOLS/bin/tox" run "$@"
