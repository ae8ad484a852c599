"""Operator tools over the tables: status, check, explain, metrics (read at scrape time), preview, the sealed demo."""
