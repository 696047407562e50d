#!/usr/bin/env bash
# Bring up a local RabbitMQ for the demo and the tests. Idempotent and quick when one is up.
#  1. something answers on localhost:5672 -> use it;
#  2. root on Debian/Ubuntu -> install rabbitmq-server if missing, start it detached, wait;
#  3. otherwise say what to install.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  echo "broker: RabbitMQ answers on localhost:5672"
  exit 0
fi

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "broker: nothing answers on localhost:5672 and I can only install RabbitMQ as root on Debian/Ubuntu." >&2
  echo "broker: install and start RabbitMQ (e.g. 'sudo apt-get install rabbitmq-server'), then run this again." >&2
  exit 1
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "broker: installing rabbitmq-server (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

# Without systemd (containers, CI) the server is started by hand, detached.
echo "broker: starting rabbitmq-server"
rabbitmq-server -detached >/dev/null 2>&1 || true
# await_startup fails at once while the node is still booting its VM: retry to a deadline.
deadline=$((SECONDS + 120))
until rabbitmqctl await_startup >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    echo "broker: RabbitMQ did not start within 120 s; see /var/log/rabbitmq/" >&2
    exit 1
  fi
  sleep 1
done
for _ in $(seq 1 50); do
  port_open && { echo "broker: RabbitMQ is up on localhost:5672"; exit 0; }
  sleep 0.2
done
echo "broker: RabbitMQ started but localhost:5672 does not answer" >&2
exit 1
