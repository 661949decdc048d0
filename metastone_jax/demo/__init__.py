"""The end-to-end demo: pipeline (stages; 1-3 are train/policy_and_heads.py), report (table,
plots), the two studies, cli."""
