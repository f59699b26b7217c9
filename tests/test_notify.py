"""scheduler.notify against real local servers: an aiosmtpd SMTP server and an HTTP server."""

from __future__ import annotations

import json
import socket
import time

import pytest
from sinks import Collector, Web, free_port
from vzbackup.scheduler.notify import Notifier, NotifySettings, body, split_smtp_server, subject

from vzbackup.errors import ConfigError

FAILED = {
    "job": "nightly",
    "kind": "vzdump",
    "status": "failed",
    "started": "2026-11-21T02:00:00+00:00",
    "ended": "2026-11-21T02:03:10+00:00",
    "duration": 190.2,
    "error": "CT 101: criu dump failed: Operation not permitted",
    "snapshots": ["ct/101/2026-11-21T02:00:00Z"],
    "bytes": 123456789,
    "details": [{"ctid": 101, "status": "failed"}, {"ctid": 102, "status": "ok"}],
    "host": "node1",
}
OK = {**FAILED, "status": "ok", "error": None}


def notifier(**kw: object) -> tuple[Notifier, list[str]]:
    logs: list[str] = []
    settings = NotifySettings(timeout=5.0, mail_from="vzbackup@node1", **kw)  # type: ignore[arg-type]
    return Notifier(settings, log=logs.append), logs


def test_failure_sends_mail_and_webhook(smtp: tuple[str, Collector], web: Web) -> None:
    server, got = smtp
    n, logs = notifier(
        mailto=["ops@example.org", "root@example.org"], smtp_server=server, webhook=web.url
    )
    assert n.notify(FAILED) == []

    assert len(got.messages) == 1
    mail_from, rcpts, msg = got.messages[0]
    assert mail_from == "vzbackup@node1"
    assert sorted(rcpts) == ["ops@example.org", "root@example.org"]
    assert msg["Subject"] == "vzbackup: job nightly FAILED on node1"
    assert msg["To"] == "ops@example.org, root@example.org"
    text = msg.get_body(preferencelist=("plain",)).get_content()
    assert "criu dump failed: Operation not permitted" in text
    assert "nightly" in text and "failed" in text
    assert "ct/101/2026-11-21T02:00:00Z" in text
    assert "2026-11-21T02:00:00+00:00" in text and "2026-11-21T02:03:10+00:00" in text
    assert '"ctid": 101' in text
    attachments = list(msg.iter_attachments())
    assert len(attachments) == 1
    assert attachments[0].get_content_type() == "application/json"
    assert json.loads(attachments[0].get_content()) == FAILED

    assert len(web.posts) == 1
    headers, data = web.posts[0]
    assert headers["Content-Type"] == "application/json"
    assert json.loads(data) == FAILED
    assert any("mail" in line and "sent" in line for line in logs)
    assert any("webhook" in line and "sent" in line for line in logs)


def test_success_with_failure_policy_sends_nothing(smtp: tuple[str, Collector], web: Web) -> None:
    server, got = smtp
    n, _ = notifier(mailto=["ops@example.org"], smtp_server=server, webhook=web.url)
    assert n.notify(OK) == []
    assert got.messages == [] and web.posts == []


def test_policy_always_sends_success(smtp: tuple[str, Collector], web: Web) -> None:
    server, got = smtp
    n, _ = notifier(
        policy="always", mailto=["ops@example.org"], smtp_server=server, webhook=web.url
    )
    assert n.notify(OK) == []
    assert len(got.messages) == 1
    assert got.messages[0][2]["Subject"] == "vzbackup: job nightly ok on node1"
    assert json.loads(web.posts[0][1])["status"] == "ok"


def test_policy_never_sends_nothing(smtp: tuple[str, Collector], web: Web) -> None:
    server, got = smtp
    n, logs = notifier(
        policy="never", mailto=["ops@example.org"], smtp_server=server, webhook=web.url
    )
    assert n.notify(FAILED) == []
    assert got.messages == [] and web.posts == [] and logs == []


def test_unreachable_smtp_and_webhook_500(web500: Web) -> None:
    port = free_port()
    n, logs = notifier(
        mailto=["ops@example.org"], smtp_server=f"127.0.0.1:{port}", webhook=web500.url
    )
    assert n.notify(FAILED) == ["mail", "webhook"]
    assert len(web500.posts) == 1  # it was delivered, the server answered 500
    mail_log = [line for line in logs if "mail" in line and "failed" in line]
    hook_log = [line for line in logs if "webhook" in line and "failed" in line]
    assert mail_log and "ConnectionRefusedError" in mail_log[0]
    assert f"127.0.0.1:{port}" in mail_log[0]
    assert hook_log and "HTTP 500" in hook_log[0]


def test_webhook_connection_refused_mail_still_sent(smtp: tuple[str, Collector]) -> None:
    server, got = smtp
    url = f"http://127.0.0.1:{free_port()}/hook"
    n, logs = notifier(mailto=["ops@example.org"], smtp_server=server, webhook=url)
    assert n.notify(FAILED) == ["webhook"]
    assert len(got.messages) == 1
    assert any("webhook" in line and "Connection refused" in line for line in logs)


def test_webhook_timeout_is_a_failure() -> None:
    # a listening socket that never answers: connect succeeds, the response never comes
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        logs: list[str] = []
        n = Notifier(NotifySettings(webhook=url, timeout=0.5), log=logs.append)
        start = time.monotonic()
        assert n.notify(FAILED) == ["webhook"]
        assert time.monotonic() - start < 5
    assert any("timed out" in line for line in logs)


def test_refused_recipient_is_a_mail_failure(smtp: tuple[str, Collector]) -> None:
    server, got = smtp
    n, logs = notifier(mailto=["ops@example.org", "nobody@example.org"], smtp_server=server)
    assert n.notify(FAILED) == ["mail"]
    assert [m[1] for m in got.messages] == [["ops@example.org"]]  # the others still get it
    assert any("nobody@example.org" in line for line in logs)


def test_no_channels_configured() -> None:
    n, logs = notifier()
    assert n.notify(FAILED) == []
    assert logs == []


def test_unserializable_event_and_broken_logger_do_not_raise(smtp: tuple[str, Collector]) -> None:
    server, got = smtp

    def bad_log(message: str) -> None:
        raise RuntimeError("log sink gone")

    n = Notifier(
        NotifySettings(mailto=["ops@example.org"], smtp_server=server, timeout=5.0), log=bad_log
    )
    event = {**FAILED, "details": [object()], "started": None}
    assert n.notify(event) == []
    assert len(got.messages) == 1
    # and with nothing listening, the failure path also survives the broken logger
    n2 = Notifier(
        NotifySettings(mailto=["a@b"], smtp_server=f"127.0.0.1:{free_port()}"), log=bad_log
    )
    assert n2.notify(FAILED) == ["mail"]


def test_settings_defaults_and_validation() -> None:
    s = NotifySettings()
    assert s.policy == "failure" and s.mailto == [] and s.webhook is None
    assert s.mail_from == f"vzbackup@{socket.gethostname()}"
    assert s.smtp_server == "localhost:25" and s.timeout == 10.0
    assert NotifySettings(mailto="a@x, b@y").mailto == ["a@x", "b@y"]  # type: ignore[arg-type]
    assert NotifySettings(policy="ALWAYS").policy == "always"
    with pytest.raises(ConfigError):
        NotifySettings(policy="sometimes")
    with pytest.raises(ConfigError):
        NotifySettings(webhook="file:///etc/passwd")
    with pytest.raises(ConfigError):
        NotifySettings(smtp_server="host:notaport")
    assert split_smtp_server("mail.example.org") == ("mail.example.org", 25)
    assert split_smtp_server("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert split_smtp_server("[::1]:587") == ("::1", 587)
    assert split_smtp_server("::1") == ("::1", 25)


def test_subject_and_body_text() -> None:
    assert subject(FAILED) == "vzbackup: job nightly FAILED on node1"
    assert subject(OK) == "vzbackup: job nightly ok on node1"
    text = body(FAILED)
    assert "error:" in text and "Operation not permitted" in text
    assert "117.7 MiB" in text and "190.2 s" in text
    assert "error:" not in body(OK)
