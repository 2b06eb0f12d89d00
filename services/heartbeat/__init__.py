"""roost heartbeat service.

The pure core (``model`` to ``pair`` below) has no sockets, no asyncio, no clock: every time is a monotonic
float handed in, so the same classes run under the UDP transport, the monitor, the agent and a simulated
clock.  The I/O edge beside it: ``transport`` (an asyncio UDP endpoint per path, which runs every received
datagram through the core), ``responder`` (the agent side, an ``AgentComponent``) and ``monitor`` (the
controller side: requests every period, verdicts on deadlines).  Not yet: the bus service that follows
inventory's hosts and publishes the verdicts, ``roost keys``, fencing.
Modules of the core, in the order a datagram goes through them:

``model``    shared names: ``Path`` (mgmt / cluster-host / oam, with the wire id), ``NodeId``, ``AlarmIntent``
             and the alarm ids (950.003 / .006 / .007 / .008 / .009; 950.002 belongs to inventory).
``wire``     the datagram: an 80-byte header in network byte order, TLVs (``KEYS``, ``HEARD``, ``LEASE``),
             then HMAC-SHA512.  ``encode(header, payload, key)`` and ``verify_then_parse(datagram, keyring,
             path=, require_auth=, cluster_id=, local_id=)``, which checks the MAC before it parses, never
             raises, and returns a ``Datagram`` or a ``DropReason``.
``keys``     ``MasterKey`` (the key id is a fingerprint), per-path keys from HKDF-SHA512, and ``Keyring``:
             verify with any accepted key, sign with the primary, and rotate (accepted, then primary once
             every peer reports holding it, then retired once no peer signs with the old key).
``replay``   ``ReplayGuard``: a 64-slot window per (sender, path), plus boot counters (stale, new, clash).
             ``BootCounter`` / ``SendSequence`` for the sender, which persists the counter before it sends.
``drops``    ``DropReason``, and ``DropCounter``: counts by (path, reason), raises 950.006 on a burst.
``paths``    ``PathHealth`` per (peer, path): unknown / up / suspect / down / asymmetric, with flap damping.
``verdict``  ``Verdict``: healthy / degraded / failed per host (``HostHealth`` events), confirmation by
             witnesses, multi-node failure mode per network.
``pair``     the controller pair: ``LeaseVoter`` on every voter, ``PairController`` on each controller.
             Majority leases, takeover only after fencing, the two_node fence race, swact, split brain.

How a receiver uses them, per datagram: ``verify_then_parse``, then ``ReplayGuard.admit``.  Count any
drop with ``DropCounter.record``.  Then ``PathHealth.heard(now, hears_me)``, where ``hears_me`` comes from
the peer's ``HEARD`` digest.  Feed ``Keyring.report`` from ``KEYS``, ``Verdict.witness_report`` from
``HEARD``, and ``PairController.peer_claim`` from the header's role and epoch.  On a timer, call
``advance`` / ``tick`` / ``evaluate`` at the times the ``next_deadline`` methods give.
"""
