"""Operator tools over the tables: status, check, preview, the demo."""
