"""Settings of the orchestrator: ``ROOST_ORCHESTRATOR_*`` environment variables.

Kubernetes is used only when it is configured explicitly, with ``ROOST_ORCHESTRATOR_KUBECONFIG`` (a
kubeconfig file; ``ROOST_ORCHESTRATOR_KUBE_CONTEXT`` picks a context other than its current one) or
``ROOST_ORCHESTRATOR_KUBE_IN_CLUSTER=true`` (the service account of the pod roost runs in).  The usual
``KUBECONFIG`` / ``~/.kube/config`` are deliberately not picked up: a developer's own cluster must never be
cordoned and drained by a roost started on the same laptop.  With neither, lock and unlock skip the node
steps and say so.

``drain_timeout`` bounds a lock's wait for its pods to leave (PodDisruptionBudgets answering 429 included).
Keep it below inventory's ``lock_timeout`` (120 s by default): past that, inventory has given up and left
the host unlocked, so a drain that went on would lock a node inventory shows unlocked.  A command that
carries a deadline is bounded by it as well.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import ConfigError, format_validation_error


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROOST_ORCHESTRATOR_", extra="forbid", frozen=True,
                                      hide_input_in_errors=True)

    kubeconfig: Path | None = Field(default=None, description="kubeconfig of the cluster whose nodes roost drains")
    kube_context: str | None = Field(default=None, description="the kubeconfig context (default: its current one)")
    kube_in_cluster: bool = Field(default=False, description="use the service account of the pod roost runs in")
    kube_request_timeout: float = Field(default=10.0, gt=0, description="seconds for one Kubernetes API request")
    drain_timeout: float = Field(default=90.0, gt=0,
                                 description="seconds a lock waits for the node's pods to be evicted and gone")
    drain_poll_interval: float = Field(default=2.0, gt=0,
                                       description="seconds between drain rounds (evictions refused are retried)")
    drain_skip_wait_after: float = Field(
        default=60.0, ge=0, description="a terminating pod still there this long past its grace period is not waited "
                                        "for (its kubelet is not acting: the host is down)")
    eviction_grace_seconds: int | None = Field(
        default=None, ge=0, description="grace period of evicted pods (default: each pod's own)")
    stabilize_seconds: int | None = Field(
        default=None, ge=0, description="how long a strategy's system-stabilize step waits (default: the VIM's 15 s "
                                        "after a reboot, 30 s without)")
    alarms_first_delay: float = Field(default=10.0, ge=0, description="seconds wait-alarms-clear waits before its "
                                      "first look (alarms raised by an unlock take a moment to arrive)")
    strategy_poll_interval: float = Field(default=2.0, gt=0, description="seconds between a strategy step's looks "
                                          "at hosts, agents and alarms")
    retry_delay_max: float | None = Field(default=None, ge=0, description="cap on the delay between a step's "
                                          "retries (default: the step's own, e.g. 90 s for lock-hosts)")
    query_timeout: float = Field(default=30.0, gt=0, description="seconds a strategy waits for inventory, the "
                                 "alarms service or an agent to answer a question")
    lock_taint_key: str = Field(default="roost.io/locked", min_length=1, max_length=316,
                                description="key of the NoExecute taint a locked host's node carries")

    @model_validator(mode="after")
    def _one_source(self) -> OrchestratorSettings:
        if self.kubeconfig is not None and self.kube_in_cluster:
            raise ValueError("set kubeconfig or kube_in_cluster, not both")
        return self

    @property
    def kube_configured(self) -> bool:
        return self.kubeconfig is not None or self.kube_in_cluster


def load_orchestrator_settings(**overrides: object) -> OrchestratorSettings:
    """``ROOST_ORCHESTRATOR_*`` with ``overrides`` (None values ignored); ``ConfigError`` naming what is wrong."""
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        return OrchestratorSettings(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:
        message = format_validation_error(exc)
        raise ConfigError(message.replace("ROOST_", "ROOST_ORCHESTRATOR_")) from None
