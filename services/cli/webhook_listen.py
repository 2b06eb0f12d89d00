"""`roost webhook listen`: a small HTTP receiver for the alarms' webhooks, to see deliveries arrive.

It answers every POST: the Standard Webhooks headers are checked with the alarms package's own
``signing.verify`` (against one or more ``whsec_`` secrets: during a rotation a subscriber knows both), and
one line per delivery is printed: ``verified`` with the webhook-id and what the body says (the roost format's
``alarm.raised`` and the alarm, or Alertmanager's status and labels), ``(again)`` when the same webhook-id
came before (a retry), or ``REJECTED`` with the reason.  A verified delivery is answered 204, a rejected one
401 (the sender retries it, then dead-letters it).  ``--show-body`` prints the body too.

Secrets come from files (``--secret-file``, one ``whsec_…`` per file, readable by its owner only) or from
``ROOST_WEBHOOK_SECRET``; never from the command line, where other users of the machine could read them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import click

from services.alarms.webhooks.signing import (
    DEFAULT_TOLERANCE,
    H_ID,
    WebhookSecretError,
    WebhookVerificationError,
    check_secret,
    verify,
)
from services.cli.alarms import webhook
from services.core.logging import register_secret

SECRET_ENV = "ROOST_WEBHOOK_SECRET"
MAX_BODY = 1 << 20            # bytes; a delivery is a few kB
SEEN = 10_000                 # webhook-ids remembered to tell a retry from a first delivery


def read_secret_file(path: Path) -> str:
    """The ``whsec_`` secret in ``path`` (one line); ``click.UsageError`` saying what is wrong, never the secret."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise click.UsageError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise click.UsageError(f"the secret file {path} can be read by others (mode {oct(mode & 0o777)}); "
                               f"chmod 600 {path}")
    return _checked(text, str(path))


def _checked(text: str, where: str) -> str:
    try:
        secret = check_secret(text)
    except WebhookSecretError as exc:
        raise click.UsageError(f"{where}: {exc}") from None
    register_secret(secret)
    return secret


def describe(body: bytes) -> str:
    """One line about what a delivery says: the roost format or Alertmanager's (pure; never raises)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"(not JSON, {len(body)} bytes)"
    if not isinstance(payload, dict):
        return "(JSON, not an object)"
    data = payload.get("data")
    if isinstance(data, dict) and isinstance(data.get("alarm"), dict):
        alarm = data["alarm"]
        return (f"{payload.get('type', '?')} {alarm.get('alarm_id', '?')} {alarm.get('severity', '?')} "
                f"{alarm.get('entity_instance_id', '?')} v{data.get('version', '?')}: {alarm.get('reason_text', '')}")
    alerts = payload.get("alerts")
    if payload.get("version") == "4" and isinstance(alerts, list):
        parts = []
        for alert in alerts:
            labels = alert.get("labels", {}) if isinstance(alert, dict) else {}
            summary = alert.get("annotations", {}).get("summary", "") if isinstance(alert, dict) else ""
            parts.append(f"{alert.get('status', '?') if isinstance(alert, dict) else '?'} "
                         f"{labels.get('alarm_id', '?')} {labels.get('severity', '?')} "
                         f"{labels.get('entity_instance_id', '?')}: {summary}")
        return "alertmanager " + "; ".join(parts)
    return f"(JSON with keys {', '.join(sorted(payload))})"


class Receiver:
    """The receiver's state: its secrets, the webhook-ids seen, and where it prints."""

    def __init__(self, secrets: list[str], *, tolerance: float, show_body: bool) -> None:
        self.secrets = secrets
        self.tolerance = tolerance
        self.show_body = show_body
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.verified = 0
        self.rejected = 0

    def receive(self, headers: dict[str, str], body: bytes, peer: str) -> int:
        """Verify and print one delivery; the HTTP status to answer."""
        now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        try:
            msg_id = verify(headers, body, self.secrets, tolerance=self.tolerance)
        except WebhookVerificationError as exc:
            with self._lock:
                self.rejected += 1
            claimed = headers.get(H_ID, "-")
            self._print(f"{now} REJECTED ({exc}) id={claimed} from {peer}")
            return 401
        with self._lock:
            again = msg_id in self._seen
            self._seen[msg_id] = None
            self._seen.move_to_end(msg_id)
            while len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            self.verified += 1
        self._print(f"{now} verified id={msg_id}{' (again)' if again else ''} {describe(body)}")
        if self.show_body:
            self._print(body.decode("utf-8", "replace"))
        return 204

    def _print(self, line: str) -> None:
        with self._lock:
            click.echo(line)
            sys.stdout.flush()


def make_server(receiver: Receiver, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "roost-webhook-listen"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._answer(413 if length > MAX_BODY else 400)
                return
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._answer(receiver.receive(headers, body, self.client_address[0]))

        def do_GET(self) -> None:
            self._answer(405)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


@webhook.command("listen")
@click.option("--host", default="127.0.0.1", show_default=True, help="Where to listen.")
@click.option("--port", type=click.IntRange(0, 65535), default=8490, show_default=True, help="0: a free port.")
@click.option("--secret-file", "secret_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding the subscriber's signing secret (whsec_…), as `roost webhook add` printed it; "
                   "repeat for a rotation.  Default: $" + SECRET_ENV + ".")
@click.option("--tolerance", type=click.FloatRange(min=1), default=DEFAULT_TOLERANCE, show_default=True,
              help="Seconds a webhook-timestamp may be off.")
@click.option("--show-body", is_flag=True, help="Print each verified body too.")
def webhook_listen(host: str, port: int, secret_files: tuple[Path, ...], tolerance: float, show_body: bool) -> None:
    """Receive webhook deliveries: verify their signatures and print one line for each (until Ctrl-C).

    Point a subscriber at it: `roost webhook add http://127.0.0.1:8490/` prints the secret; put it in a file
    (chmod 600) and pass --secret-file."""
    secrets = [read_secret_file(p) for p in secret_files]
    if not secrets and os.environ.get(SECRET_ENV):
        secrets = [_checked(os.environ[SECRET_ENV].strip(), SECRET_ENV)]
    if not secrets:
        raise click.UsageError(f"no secret to verify with: pass --secret-file FILE or set {SECRET_ENV}")
    receiver = Receiver(secrets, tolerance=tolerance, show_body=show_body)
    try:
        server = make_server(receiver, host, port)
    except OSError as exc:
        click.echo(f"roost: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(1)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound = server.server_address[1]
    click.echo(f"listening on http://{host}:{bound}/ for webhook deliveries "
               f"(verifying with {len(secrets)} secret{'s' if len(secrets) > 1 else ''}); Ctrl-C stops")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    click.echo(f"stopped: {receiver.verified} verified, {receiver.rejected} rejected")
