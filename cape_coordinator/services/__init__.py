"""The coordinator's services, one job each; see :mod:`cape_coordinator.coordinator`."""
