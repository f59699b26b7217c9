"""Job notifications for the scheduler daemon: mail (SMTP) and a JSON webhook.

A notification is sent after a job run according to the policy (``failure``: only when the
run did not end ``ok``; ``always``; ``never``). Delivering it must never take the daemon down:
`Notifier.notify` catches every error, logs the reason and returns the channels that failed.
"""

from __future__ import annotations

import json
import logging
import smtplib
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from vzbackup.errors import ConfigError

POLICIES = ("failure", "always", "never")
MAIL = "mail"
WEBHOOK = "webhook"

_logger = logging.getLogger(__name__)


def _default_from() -> str:
    return f"vzbackup@{socket.gethostname()}"


@dataclass
class NotifySettings:
    """Where and when to send notifications (the ``[notify]`` part of the scheduler config)."""

    policy: str = "failure"  # failure | always | never
    mailto: list[str] = field(default_factory=list)
    mail_from: str = field(default_factory=_default_from)
    smtp_server: str = "localhost:25"
    webhook: str | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.policy = str(self.policy).strip().lower()
        if self.policy not in POLICIES:
            raise ConfigError(f"notify policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if isinstance(self.mailto, str):
            self.mailto = self.mailto.replace(",", " ").split()
        self.mailto = [a.strip() for a in self.mailto if a and a.strip()]
        if self.webhook is not None and not self.webhook.strip():
            self.webhook = None
        if self.webhook is not None:
            scheme = urllib.parse.urlsplit(self.webhook).scheme.lower()
            if scheme not in ("http", "https"):
                raise ConfigError(f"notify webhook {self.webhook!r} must be an http(s) URL")
        if not self.timeout or self.timeout <= 0:
            raise ConfigError(f"notify timeout must be positive, not {self.timeout!r}")
        split_smtp_server(self.smtp_server)  # validate early


def split_smtp_server(server: str) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or 'v6' → (host, port); the port defaults to 25."""
    text = server.strip()
    if not text:
        raise ConfigError("notify smtp_server is empty")
    host, port = text, "25"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"notify smtp_server {server!r}: unbalanced '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"notify smtp_server {server!r}: expected ':port' after ']'")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"notify smtp_server {server!r}: bad port {port!r}") from None
    if not host or not 0 < number < 65536:
        raise ConfigError(f"notify smtp_server {server!r}: bad host or port")
    return host, number


def _status_word(event: dict[str, Any]) -> str:
    return "ok" if event.get("status") == "ok" else "FAILED"


def subject(event: dict[str, Any]) -> str:
    host = event.get("host") or socket.gethostname()
    return f"vzbackup: job {event.get('job', '?')} {_status_word(event)} on {host}"


def _size(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def body(event: dict[str, Any]) -> str:
    """A plain-text summary of a job run record, for people reading mail."""
    lines = [
        f"job:       {event.get('job', '?')}",
        f"kind:      {event.get('kind', '?')}",
        f"status:    {event.get('status', '?')}",
        f"host:      {event.get('host') or socket.gethostname()}",
        f"started:   {event.get('started', '?')}",
        f"ended:     {event.get('ended', '?')}",
    ]
    duration = event.get("duration")
    if duration is not None:
        try:
            lines.append(f"duration:  {float(duration):.1f} s")
        except (TypeError, ValueError):
            lines.append(f"duration:  {duration}")
    if event.get("bytes") is not None:
        lines.append(f"bytes:     {_size(event['bytes'])}")
    error = event.get("error")
    if error:
        lines += ["", "error:"] + [f"  {line}" for line in str(error).splitlines() or [""]]
    snapshots = event.get("snapshots") or []
    if snapshots:
        lines += ["", "snapshots:"] + [f"  {_item(s)}" for s in snapshots]
    details = event.get("details") or []
    if details:
        lines += ["", "details:"] + [f"  {_item(d)}" for d in details]
    lines += ["", "The full run record is attached as JSON.", ""]
    return "\n".join(lines)


def _item(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def event_json(event: dict[str, Any]) -> str:
    return json.dumps(event, indent=2, sort_keys=True, default=str)


class Notifier:
    """Sends job run records by mail and/or webhook; never raises from `notify`."""

    def __init__(self, settings: NotifySettings, log: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._log_fn = log

    def _log(self, message: str) -> None:
        try:
            if self._log_fn is not None:
                self._log_fn(message)
            else:
                _logger.warning("%s", message)
        except Exception:  # a broken logger must not break the daemon either
            _logger.exception("notify: log callback failed")

    def should_send(self, event: dict[str, Any]) -> bool:
        policy = self.settings.policy
        if policy == "always":
            return True
        if policy == "failure":
            return event.get("status") != "ok"
        return False

    def notify(self, event: dict[str, Any]) -> list[str]:
        """Send `event` on every configured channel; returns the channels that failed."""
        failed: list[str] = []
        try:
            if not self.should_send(event):
                return failed
            channels: list[tuple[str, Callable[[dict[str, Any]], str]]] = []
            if self.settings.mailto:
                channels.append((MAIL, self.send_mail))
            if self.settings.webhook:
                channels.append((WEBHOOK, self.send_webhook))
        except Exception as exc:
            self._log(f"notify: cannot prepare notification: {type(exc).__name__}: {exc}")
            return [MAIL, WEBHOOK]
        for name, send in channels:
            try:
                where = send(event)
            except Exception as exc:
                failed.append(name)
                self._log(
                    f"notify: {name} for job {event.get('job', '?')} failed "
                    f"({self._target(name)}): {type(exc).__name__}: {exc}"
                )
            else:
                self._log(f"notify: {name} for job {event.get('job', '?')} sent to {where}")
        return failed

    def _target(self, name: str) -> str:
        s = self.settings
        if name == MAIL:
            return f"to {', '.join(s.mailto)} via {s.smtp_server}"
        return f"POST {s.webhook}"

    def message(self, event: dict[str, Any]) -> EmailMessage:
        s = self.settings
        msg = EmailMessage()
        msg["Subject"] = subject(event)
        msg["From"] = s.mail_from
        msg["To"] = ", ".join(s.mailto)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=s.mail_from.rpartition("@")[2] or None)
        msg.set_content(body(event))
        msg.add_attachment(
            event_json(event).encode(),
            maintype="application",
            subtype="json",
            filename=f"vzbackup-{event.get('job', 'job')}.json",
        )
        return msg

    def send_mail(self, event: dict[str, Any]) -> str:
        s = self.settings
        host, port = split_smtp_server(s.smtp_server)
        msg = self.message(event)
        with smtplib.SMTP(host, port, timeout=s.timeout) as smtp:
            refused = smtp.send_message(msg, from_addr=s.mail_from, to_addrs=s.mailto)
        if refused:
            who = ", ".join(f"{addr} ({code} {reply!r})" for addr, (code, reply) in refused.items())
            raise RuntimeError(f"recipients refused: {who}")
        return f"{', '.join(s.mailto)} via {host}:{port}"

    def send_webhook(self, event: dict[str, Any]) -> str:
        s = self.settings
        assert s.webhook is not None
        request = urllib.request.Request(
            s.webhook,
            data=event_json(event).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "vzbackup-scheduler"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=s.timeout) as response:
                status = response.status
                response.read(65536)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise RuntimeError(f"HTTP {exc.code} {exc.reason}") from None
        if not 200 <= status < 300:
            raise RuntimeError(f"HTTP {status}")
        return f"{s.webhook} (HTTP {status})"
