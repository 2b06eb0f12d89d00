"""Webhook delivery engine of the alarms service (see the modules: signing, formats, store, dispatcher)."""
