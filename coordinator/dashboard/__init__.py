"""The read-only web dashboard: jobs, rounds, silos and live metric curves, on its own port (off by default)."""

from coordinator.dashboard.endpoint import DashboardEndpoint

__all__ = ["DashboardEndpoint"]
