"""fedmeki core: what the coordinator, the silo agents and the clients share."""

__version__ = "0.1.0"
