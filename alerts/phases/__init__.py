"""The pipeline's phases, each a plain function ``run_phase_x(db, clock, settings, channels)``:
ingest (producers' events stored), A intake, B fan-out, D digest build, C send; and
``pipeline`` runs them in order under their advisory locks."""
