"""Broker settings that confine a worker: plain text only on loopback, TLS that checks, a Redis
user whose grant names only its own keys and the commands kombu needs, certificates that chain."""

import os
import ssl
import subprocess
import sys

import pytest

from farm.broker import BrokerConfigError, create_app, redis_user, worker_app, worker_keyprefix
from farm.settings import Settings, broker_url_problem
from orchestrator.brokerusers import WORKER_COMMANDS, worker_acl_rules, worker_broker_url
from tests.conftest import REPO


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://localhost/0", "redis://[::1]:6379/0",
                                 "redis://:pw@127.3.4.5:6379/1", "rediss://broker.example.org:6380/0",
                                 "filesystem://"])
def test_plain_text_redis_is_allowed_on_loopback_and_tls_anywhere(url):
    assert broker_url_problem(url) is None


@pytest.mark.parametrize("url", ["redis://10.0.0.5:6379/0", "redis://:secret@redis:6379/0",
                                 "redis://broker.example.org/0"])
def test_plain_text_redis_off_loopback_is_refused_with_the_fix(url, data_dir):
    problem = broker_url_problem(url)
    assert problem and "rediss://" in problem and "TOKENFARM_BROKER_CA_FILE" in problem and "\n" not in problem
    assert "secret" not in problem
    with pytest.raises(BrokerConfigError, match="plain-text broker URL"):
        create_app(Settings(broker_url=url))


def test_a_worker_given_a_plain_text_remote_broker_stops_with_one_line(data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFARM_")}
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public_pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    env.update(TOKENFARM_DATA_DIR=str(data_dir), TOKENFARM_WORKER_TOKEN="t", TOKENFARM_JOBS_PUBLIC_KEY=public_pem,
               TOKENFARM_BROKER_URL="redis://:pw@203.0.113.7:6379/0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "worker", "--name", "w1"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: plain-text broker URL to 203.0.113.7")


def test_tls_always_checks_the_certificate_and_host_name(data_dir, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    app = create_app(Settings(broker_url="rediss://w%3Aa:pw@broker.example.org:6380/0", broker_ca_file=ca))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True,
                                       "ssl_ca_certs": str(ca)}
    with pytest.raises(BrokerConfigError, match="no such file"):
        create_app(Settings(broker_url="rediss://h:6380/0", broker_ca_file=tmp_path / "missing.pem"))


def test_a_confined_worker_works_under_its_prefix_with_broadcasts_off(data_dir):
    s = Settings(broker_url="redis://127.0.0.1:6379/0", broker_confined=True, worker_name="box-1")
    app = worker_app(s)
    assert app.conf.broker_transport_options["global_keyprefix"] == "tf:w:box-1:"
    assert not app.conf.worker_enable_remote_control and not app.conf.worker_send_task_events
    # The orchestrator's app sees every key; an unconfined worker's has no prefix either.
    assert "global_keyprefix" not in create_app(s).conf.broker_transport_options
    assert "global_keyprefix" not in worker_app(s.model_copy(update={"broker_confined": False})).conf.broker_transport_options


@pytest.mark.parametrize("name", ["a*", "a:b", "a b", "[x]", "a?", "", "x" * 101, "a\\b"])
def test_a_name_that_would_widen_a_key_pattern_gets_no_confined_user(name):
    with pytest.raises(BrokerConfigError, match="cannot have a confined Redis user"):
        worker_keyprefix(name)


def test_a_workers_grant_names_only_its_own_keys_and_no_dangerous_command():
    rules = worker_acl_rules("box-1", "pw")
    assert rules[:2] == ["reset", "on"]  # a rotation keeps nothing of the old user
    assert [r for r in rules if r.startswith("~")] == ["~tf:w:box-1:*"]
    assert "resetchannels" in rules and not any(r.startswith("&") for r in rules)
    assert "-@all" in rules and not any(r.startswith("+@") for r in rules)
    forbidden = {"keys", "scan", "flushall", "flushdb", "config", "monitor", "client", "acl", "eval", "script",
                 "script|flush", "debug", "shutdown", "subscribe", "psubscribe", "publish", "select", "rename",
                 "lmove", "rpoplpush", "hgetall", "lrange", "info", "swapdb", "migrate", "restore", "module"}
    assert forbidden.isdisjoint(WORKER_COMMANDS)
    assert redis_user("box-1") == "w:box-1"


def test_the_join_url_carries_the_users_name_and_password_escaped():
    url = worker_broker_url("rediss://tf-admin:x@redis:6380/0", "box-1", "p/w:1")
    assert url == "rediss://w%3Abox-1:p%2Fw%3A1@redis:6380/0"
    assert worker_broker_url("rediss://tf-admin:x@redis:6380/0", "box-1", "pw", "farm.example.org:16380") == \
        "rediss://w%3Abox-1:pw@farm.example.org:16380/0"


def test_broker_certs_chain_to_their_ca_and_name_each_host(tmp_path):
    from cryptography import x509

    from orchestrator.brokercerts import CertError, make_certs

    files = make_certs(tmp_path / "certs", ["redis", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["redis"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.server_key.stat().st_mode & 0o077 == 0 and files.ca_key.stat().st_mode & 0o077 == 0
    # The certificate is one Python's TLS stack accepts against that CA.
    ssl.create_default_context(cafile=str(files.ca_cert))
    with pytest.raises(CertError, match="--overwrite"):
        make_certs(tmp_path / "certs", ["redis"])
