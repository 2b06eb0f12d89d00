"""The host agent (``roost agent``): one process per host.

* ``discovery``: what the machine is made of, read from the real ``/proc`` and ``/sys`` (every function
  takes a root directory, so tests read a fake tree);
* ``agent``: ``HostAgent``, which logs in to the bus as its own broker user ``agent-<name>``, announces
  itself (``roost.agent.<name>.hello``) and reports its hardware (``roost.agent.<name>.inventory``).

The heartbeat and orchestrator issues extend the agent through ``AgentComponent`` (things it runs while
it is connected), not by editing its loop.
"""
