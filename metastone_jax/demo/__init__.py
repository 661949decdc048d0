"""The end-to-end demo: pipeline (stages), report (table, plots), cli."""
