"""The master role: command handling, the event log, and (later) placement and reconciliation."""
