"""Prefect flows: glue around `mixer` calls (one task per call); the only package importing prefect."""
