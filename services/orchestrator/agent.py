"""The update side of a host's agent: which release the host runs, and installing another one.

:class:`UpdateAgentComponent` is an ``AgentComponent`` (``services.inventory.agent.agent``).  At start it
registers the handlers of two commands, which reach the agent on its own subjects:

* ``roost.cmd.agent.release`` (``roost.cmd.agent.<agent>.release``): the release the host runs;
* ``roost.cmd.agent.update`` (``roost.cmd.agent.<agent>.update``): install a release.  A host already on it
  answers at once and installs nothing (the command is idempotent, so an orchestrator that restarted and
  asks again does no harm); otherwise the install runs and the answer is the release now running, or a
  refusal saying why the install failed.

The install is simulated: a real agent would fetch and install the release here.  This one waits
``install_seconds`` and records the release in its state dir (``release.json``, written atomically,
``0600``), so it survives a restart of the agent, with the history of its installs (``installs``, the
number roost's tests count to prove that no install was repeated).  ``fail_releases`` names releases
whose install fails (``roost agent run --simulate-update-failure RELEASE``, for tests and the demo).
One install at a time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from schemas.orchestrator import AgentRelease, AgentUpdate, Release
from services.core.bus.bus import Message, Reject
from services.core.files import write_private

if TYPE_CHECKING:
    from services.inventory.agent.agent import HostAgent

__all__ = ["QUERY_COMMAND", "RELEASE_FILE", "UPDATE_COMMAND", "UpdateAgentComponent", "saved_state"]

log = structlog.get_logger("roost.orchestrator.agent")

UPDATE_COMMAND = "roost.cmd.agent.update"
QUERY_COMMAND = "roost.cmd.agent.release"
RELEASE_FILE = "release.json"
HISTORY_MAX = 100


def saved_state(state_dir: Path | str) -> dict[str, Any]:
    """What ``release.json`` in ``state_dir`` holds (empty when there is none or it cannot be read)."""
    try:
        value = json.loads((Path(state_dir) / RELEASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class UpdateAgentComponent:
    name = "update"

    def __init__(self, state_dir: Path | str, *, fail_releases: Collection[str] = (),
                 install_seconds: float = 0.0) -> None:
        self.state_dir = Path(state_dir)
        self.fail_releases = frozenset(fail_releases)
        self.install_seconds = install_seconds
        self.release: Release | None = None
        self.installs: list[dict[str, str]] = []
        self._agent = ""
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self.state_dir / RELEASE_FILE

    async def start(self, agent: HostAgent) -> None:
        self._agent = agent.name
        self._load()
        agent.handle(UPDATE_COMMAND, self._on_update)
        agent.handle(QUERY_COMMAND, self._on_query)
        log.info("update: ready", agent=agent.name, release=self.release.name if self.release else None)

    async def stop(self) -> None:
        async with self._lock:
            pass

    def _load(self) -> None:
        raw = saved_state(self.state_dir)
        if not raw:
            return
        try:
            self.release = Release.model_validate(raw["release"]) if raw.get("release") else None
        except ValidationError:
            log.warning("update: the saved release is invalid; ignored", path=str(self.path))
        installs = raw.get("installs")
        if isinstance(installs, list):
            self.installs = [i for i in installs if isinstance(i, dict)][-HISTORY_MAX:]

    def _answer(self, detail: str = "") -> AgentRelease:
        return AgentRelease(agent=self._agent, release=self.release, detail=detail)

    async def _on_query(self, _message: Message) -> AgentRelease:
        return self._answer()

    async def _on_update(self, message: Message) -> AgentRelease:
        data = message.data
        assert isinstance(data, AgentUpdate)
        wanted = data.release
        async with self._lock:
            if self.release == wanted:
                return self._answer(f"already on {wanted.name}: nothing installed")
            log.info("update: installing", agent=self._agent, release=wanted.name, version=wanted.version)
            if self.install_seconds > 0:
                await asyncio.sleep(self.install_seconds)
            if wanted.name in self.fail_releases:
                log.warning("update: install failed (simulated)", agent=self._agent, release=wanted.name)
                raise Reject(f"installing {wanted.name} {wanted.version} failed on {self._agent} "
                             "(simulated failure); the host stays on "
                             f"{self.release.name if self.release else 'its current release'}")
            previous = self.release
            installs = [*self.installs, {"release": wanted.name, "version": wanted.version,
                                         "at": datetime.now(UTC).isoformat()}][-HISTORY_MAX:]
            body = {"release": wanted.model_dump(mode="json"), "installs": installs}
            await asyncio.to_thread(self._write, json.dumps(body, indent=2) + "\n")   # on disk first
            self.release, self.installs = wanted, installs
            log.info("update: installed", agent=self._agent, release=wanted.name,
                     previous=previous.name if previous else None)
            return self._answer(f"installed {wanted.name} {wanted.version}"
                                + (" (takes effect when the host reboots)" if wanted.reboot_required else ""))

    def _write(self, text: str) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self.path, text)
