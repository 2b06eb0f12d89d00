"""roost orchestrator: the Kubernetes side of host lock / unlock (``maintenance``, over the ``kube`` interface,
served on the bus by ``service``), and update strategies (``strategy``: how one is built into stages and steps)."""
