"""roost orchestrator: the Kubernetes side of host lock / unlock (``maintenance``, over the ``kube`` interface,
served on the bus by ``service``), and update strategies: how one is built into stages and steps
(``strategy``), its state machine (``apply``, pure), its tables (``store``), how its steps are carried out
and resumed after a restart (``executor``), its REST API (``api``), and the agents' side of an update
(``agent``, run by `roost agent run`)."""
