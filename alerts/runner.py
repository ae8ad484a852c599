"""Cron-safe one-shot runner: ``python -m alerts.runner --phase all`` (docs/architecture.md), the
same command as ``alerts run`` (alerts/cli/run.py)."""
from alerts.cli.run import run

if __name__ == "__main__":
    run(prog_name="python -m alerts.runner")
