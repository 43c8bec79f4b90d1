"""Datasets: the procedural shapes world (more sources come with the data pipeline)."""
