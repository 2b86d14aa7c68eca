"""Alembic migrations for the orchestrator's database; target_metadata is orchestrator.db's."""
