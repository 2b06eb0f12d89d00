"""Alarms through a running `roost up` (embedded NATS with its broker policy, embedded PostgreSQL): a service
raises a fault with its own broker credentials, the operator sees it with `roost alarm` and `roost event`,
suppresses it, clears it, and a subscriber registered with `roost webhook add` receives signed deliveries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.alarms.webhooks import verify
from tests.integration.test_roost_up import Up, clean_env, data_dir, roost

pytestmark = pytest.mark.slow
__all__ = ["data_dir"]            # the fixture, shared with the roost up tests

RAISE_AS_A_SERVICE = """
import asyncio, sys
from pathlib import Path
from services.cli.client import Runtime
from services.core.brokerauth_apply import broker_password_secret
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.secrets import SecretStore
from services.core.settings import url_with_credentials

async def main():
    data, service = Path(sys.argv[1]), "inventory"
    runtime = Runtime.load(data)
    password = SecretStore.in_data_dir(data).get_text(broker_password_secret(service)).get_secret_value()
    bus = Bus(transport_from_url(url_with_credentials(runtime.bus_url, service, password)), source="roost/inventory")
    await bus.connect()
    try:
        for host in ("worker-1", "worker-10"):
            await bus.publish(bus.envelope("roost.fault.set", {
                "alarm_id": "950.004", "entity_instance_id": f"host={host}", "severity": "major",
                "reason_text": f"BMC of {host} does not answer"}))
    finally:
        await bus.close()
asyncio.run(main())
"""


def until(condition_output: str, *args: str, data_dir: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = roost(data_dir, *args).stdout
        if condition_output in out:
            return out
        assert time.monotonic() < deadline, f"`roost {' '.join(args)}` never showed {condition_output!r}:\n{out}"
        time.sleep(0.2)


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_fault_raised_by_a_service_is_listed_suppressed_and_cleared(data_dir: Path) -> None:
    up = Up(data_dir, clean_env())
    receiver = Receiver()
    try:
        up.wait_ready()
        added = roost(data_dir, "webhook", "add", f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                      "--severity", "major")
        assert added.returncode == 0, added.stderr
        subscriber, secret = added.stdout.splitlines()[:2]
        assert secret.startswith("whsec_")
        raised = subprocess.run([sys.executable, "-c", RAISE_AS_A_SERVICE, str(data_dir)], env=clean_env(),
                                capture_output=True, text=True, timeout=60)
        assert raised.returncode == 0, raised.stderr
        listed = until("host=worker-10", "alarm", "list", "--json", data_dir=data_dir)
        items = json.loads(listed)["result"]["items"]
        assert sorted(i["entity_instance_id"] for i in items) == ["host=worker-1", "host=worker-10"]
        assert int(roost(data_dir, "alarm", "summary").stdout.splitlines()[1].split()[1]) == 2, "major: 2"

        assert roost(data_dir, "alarm", "suppress", "950.004").returncode == 0
        assert roost(data_dir, "alarm", "list").stdout.strip() == "(none)", "suppressed ids are hidden"
        assert "host=worker-1" in roost(data_dir, "alarm", "list", "--include-suppress").stdout
        assert roost(data_dir, "alarm", "unsuppress", "950.004").returncode == 0

        worker_1 = next(i["uuid"] for i in items if i["entity_instance_id"] == "host=worker-1")
        assert roost(data_dir, "alarm", "clear", worker_1).stdout.strip() == "cleared"
        left = json.loads(roost(data_dir, "alarm", "list", "--json").stdout)["result"]["items"]
        assert [i["entity_instance_id"] for i in left] == ["host=worker-10"], "an exact clear, not a prefix"

        history = until("950.501", "event", "list", data_dir=data_dir)
        assert "950.004" in history and "clear" in history, "sets, the clear and the operator's action are logged"
        deadline = time.monotonic() + 30
        while len(receiver.received) < 3:                # two raised, one cleared
            assert time.monotonic() < deadline, f"webhooks delivered: {len(receiver.received)}"
            time.sleep(0.1)
        for headers, body in receiver.received:
            verify(headers, body, secret)                 # raises when the signature does not hold
        events = [json.loads(body)["type"] for _, body in receiver.received]
        assert sorted(events) == ["alarm.cleared", "alarm.raised", "alarm.raised"], events
        listed_hooks = json.loads(roost(data_dir, "webhook", "list", "--json").stdout)["result"]["items"]
        assert [(h["id"], h["failing"]) for h in listed_hooks] == [(subscriber, False)]
        assert roost(data_dir, "webhook", "remove", subscriber).stdout.strip() == "removed"

        denied = roost(data_dir, "--token", "roost_not-a-token", "alarm", "list")
        assert denied.returncode == 1 and "unauthenticated" in denied.stderr
        assert up.interrupt() == 0, up.stderr.read_text()[-3000:]
    finally:
        receiver.shutdown()
        if up.process.poll() is None:
            up.process.kill()
