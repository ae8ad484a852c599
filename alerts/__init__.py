"""EnergyRiskIQ Alerts: energy-risk events to instant and digest messages (docs/architecture.md)."""

__version__ = "0.2.0"
