"""Every `roost` call imports the CLI with all its commands; it must not import the services' host (FastAPI, the
runner) that only `roost up` / `roost serve` run: that was half a second of each `roost alarm list`."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "services.core.host", "services.core.runner", "uvicorn")


def test_the_cli_with_all_its_commands_leaves_the_services_host_unimported() -> None:
    probe = ("import sys\n"
             "from services.cli import main\n"
             "main.cli.main = lambda *a, **k: None      # register every command, run none\n"
             "main.main()\n"
             "assert {'alarm', 'demo', 'serve', 'up', 'subcloud', 'webhook'} <= set(main.cli.commands), "
             "sorted(main.cli.commands)\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
