#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: a virtual environment with speed-gevent,
# a local RabbitMQ, 2,000 sample messages on two queues, and a run that drains them and
# ends with the runner's one-line summary. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "demo: python3 with venv is required (e.g. 'sudo apt-get install python3-venv')" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/speed-gevent ]; then
  echo "demo: creating .venv and installing speed-gevent"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e .

scripts/broker.sh

export SPEED_GEVENT_BROKER=${SPEED_GEVENT_BROKER:-amqp://guest:guest@localhost:5672//}
.venv/bin/speed-gevent publish demo-hello --count 1000 --body '{"queue": "hello", "n": {n}}'
.venv/bin/speed-gevent publish demo-world --count 1000 --body '{"queue": "world", "n": {n}}'
exec .venv/bin/speed-gevent run examples.handlers:handle \
  --queue demo-hello --queue demo-world --exit-when-idle 5s "$@"
