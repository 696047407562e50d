from __future__ import annotations

import subprocess
import sys

import pytest

from speed_gevent.app import App
from speed_gevent.errors import TargetError
from speed_gevent.target import load_target, parse_target
from speed_gevent.urls import check_broker_url, connection_params, mask_secrets, mask_url


@pytest.mark.parametrize("target, message", [
    ("nocolon", "expected module:callable"),
    ("bad module:x", "is not a module path"),
    ("mod:1x", "is not an attribute name"),
    ("tests.apps.nothere:handle", "cannot import module 'tests.apps.nothere': ModuleNotFoundError"),
    ("tests.apps.recorder:missing", "has no attribute 'missing'"),
    ("tests.apps.recorder:_RECORD", "is a str, not callable"),
    ("tests.apps.broken:handle", "cannot import module 'tests.apps.broken': RuntimeError"),
])  # fmt: skip
def test_target_errors_are_one_clear_line(target, message):
    with pytest.raises(TargetError, match=message) as info:
        load_target(target)
    assert "\n" not in str(info.value)


def test_target_callable_and_app():
    assert load_target("tests.apps.recorder:handle").message_handler is not None
    app = load_target("tests.apps.lifecycle:app")
    assert isinstance(app, App)


def test_parse_target():
    assert parse_target("a.b:c") == ("a.b", "c")


@pytest.mark.parametrize("url, masked", [
    ("amqp://guest:guest@localhost:5672//", "amqp://guest:**@localhost:5672//"),
    ("amqps://user:p%40ss:w@host/vh", "amqps://user:**@host/vh"),
    ("amqp://localhost//", "amqp://localhost//"),
    ("amqp://user@host//", "amqp://user@host//"),
    ("amqp://u:secret@host:notaport//", "amqp://u:**@host:notaport//"),
])  # fmt: skip
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_mask_secrets_in_foreign_text():
    url = "amqp://bob:s3cret@host//"
    assert "s3cret" not in mask_secrets(f"failed for {url} with password s3cret", url)


@pytest.mark.parametrize(
    "url", ["amqp://h:0//", "amqp://h:70000//", "redis://h//", "amqp:///", "amqp://h:x//"]
)
def test_bad_broker_urls(url):
    with pytest.raises(ValueError):
        check_broker_url(url)


def test_package_import_is_light():
    """The entry point must patch before kombu/gevent load; importing the package must not load them."""
    code = (
        "import sys, speed_gevent; from speed_gevent import App, Retry, Reject; "
        "print(sorted(m for m in ('gevent', 'kombu', 'amqp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@localhost:5672//",
    "amqp://u:p@h/",
    "amqp://u:p@h",
    "amqp://u:p@h:5673/vh",
    "amqp://u:p%40ss@h//",
    "pyamqp://u:p@h/%2F",
    "amqp://h:5672/a%2Fb",
    "amqp://[::1]:5672//",
    "amqp://:@h//",
    "amqp://u:@h//",
])  # fmt: skip
def test_connection_params_read_urls_as_kombu_does(url):
    """Users' kombu URLs carry over: the master reads them without kombu, the same way."""
    from kombu import Connection

    theirs = Connection(url)
    ours = connection_params(url)
    host, _, port = ours["host"].rpartition(":")
    assert (host.strip("[]"), int(port)) == (theirs.hostname, theirs.port or 5672)
    assert (ours["userid"], ours["password"]) == (theirs.userid or "guest", theirs.password or "guest")
    assert ours["virtual_host"] == theirs.virtual_host and ours["ssl"] is False


def test_amqps_means_tls_on_5671():
    params = connection_params("amqps://u:p@broker.example//")
    assert params["ssl"] is True and params["host"] == "broker.example:5671"


def test_tls_options_in_the_query_reach_py_amqp_under_its_names():
    url = "amqps://u:p@h//?ssl_ca_certs=/ca.pem&ssl_cert_reqs=CERT_REQUIRED&ssl_certfile=/c&ssl_keyfile=/k"
    assert check_broker_url(url) == url
    assert connection_params(url)["ssl"] == {
        "ca_certs": "/ca.pem",
        "cert_reqs": 2,
        "certfile": "/c",
        "keyfile": "/k",
    }


@pytest.mark.parametrize("url, why", [
    ("amqp://u:s1@h1//;amqp://u:s2@h2//", "one broker only"),
    ("amqp://u:p@h//?heartbeat=10", "unknown option 'heartbeat'"),
    ("amqp://u:p@h//?ssl_ca_certs=/ca.pem", "needs amqps"),
    ("amqps://u:p@h//?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
    ("amqps://u:p@h//?ssl_cert_reqs=CERT_NONE&ssl_server_hostname=h", "CERT_NONE does not ask"),
    ("amqp://u:s1;x@h//?heartbeat=1", "unknown option"),
])  # fmt: skip
def test_urls_we_would_misread_are_refused_without_their_secrets(url, why):
    with pytest.raises(ValueError, match=why) as refused:
        check_broker_url(url)
    assert "s1" not in str(refused.value) and "s2" not in str(refused.value)


def test_a_semicolon_in_a_password_is_neither_a_failover_list_nor_shown():
    url = "amqp://u:se;cret@h//"
    assert check_broker_url(url) == url
    assert "cret" not in mask_url(url) and connection_params(url)["password"] == "se;cret"


@pytest.mark.parametrize("text, address", [
    ("9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9100", ("::1", 9100)),
    (" localhost:80 ", ("localhost", 80)),
])  # fmt: skip
def test_http_addresses_default_to_the_loopback(text, address):
    from speed_gevent.httpaddr import parse_address

    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["localhost", "host:", "host:0", "host:65536", "a:b"])
def test_bad_http_addresses_say_what_is_expected(text):
    from speed_gevent.httpaddr import parse_address

    with pytest.raises(ValueError, match="HOST:PORT|between 1 and 65535"):
        parse_address(text)
