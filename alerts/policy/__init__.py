"""Delivery policy as pure functions: digest windows (DST-safe) and quiet hours."""
