"""Settings, the run's clock, the database and its tables: what every other part stands on."""
