"""Board management controllers: the interface (``abc``), the Redfish driver, the audit, and how BMC
passwords are kept (encrypted at rest) and handed to the heartbeat service (sealed)."""
