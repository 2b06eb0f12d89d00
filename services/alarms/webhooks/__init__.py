"""Webhook delivery engine of the alarms service.

What the alarms service calls:

* in the transaction that changes an alarm: ``await enqueue(conn, Notification(event=..., version=...,
  alarm=AlarmFields.model_validate(alarm, from_attributes=True)))`` (one notification row; the dispatcher's
  ``fan_out`` makes a delivery row per matching subscriber);
* once per process: ``WebhookDispatcher(pool, DispatcherSettings(...), on_subscription_failing=...,
  on_subscription_recovered=...).start()`` and ``await dispatcher.stop()`` at shutdown;
* for the API / CLI: ``create_subscription``, ``list_subscriptions``, ``get_subscription``,
  ``delete_subscription``, ``update_filters``, ``add_secret`` / ``retire_secret`` (rotation),
  ``dead_letters``, ``replay``, ``queue_depth``, ``purge_delivered``, ``purge_notifications``, ``fan_out``;
* receivers (tests, ``roost webhook listen``): ``verify(headers, body, secrets, tolerance=...)``.

Tables: ``services/alarms/migrations/0100_webhooks.sql`` and ``0101_webhook_notifications.sql``
(``migrate(pool, "alarms", directory)``).
Modules: ``signing`` (Standard Webhooks), ``formats`` (roost JSON, Alertmanager v4), ``store``
(subscriptions, queue), ``dispatcher`` (sending), ``metrics``.
"""

from services.alarms.webhooks.dispatcher import DispatcherSettings, DispatcherStats, SubscriptionHook, WebhookDispatcher
from services.alarms.webhooks.formats import AlarmFields, EventKind, Format, Notification, render
from services.alarms.webhooks.signing import (
    WebhookSecretError,
    WebhookVerificationError,
    generate_secret,
    sign_headers,
    verify,
)
from services.alarms.webhooks.store import (
    DeadLetter,
    Filters,
    Subscription,
    SubscriptionError,
    UnknownSubscription,
    add_secret,
    create_subscription,
    dead_letters,
    delete_subscription,
    enqueue,
    fan_out,
    get_subscription,
    list_subscriptions,
    purge_delivered,
    purge_notifications,
    queue_depth,
    replay,
    retire_secret,
    update_filters,
)

__all__ = [
    "AlarmFields",
    "DeadLetter",
    "DispatcherSettings",
    "DispatcherStats",
    "EventKind",
    "Filters",
    "Format",
    "Notification",
    "Subscription",
    "SubscriptionError",
    "SubscriptionHook",
    "UnknownSubscription",
    "WebhookDispatcher",
    "WebhookSecretError",
    "WebhookVerificationError",
    "add_secret",
    "create_subscription",
    "dead_letters",
    "delete_subscription",
    "enqueue",
    "fan_out",
    "generate_secret",
    "get_subscription",
    "list_subscriptions",
    "purge_delivered",
    "purge_notifications",
    "queue_depth",
    "render",
    "replay",
    "retire_secret",
    "sign_headers",
    "update_filters",
    "verify",
]
