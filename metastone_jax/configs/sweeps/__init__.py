"""Scaling sweep configs (`metastone-jax sweep --config=cpu`, or --config=FILE.py); no presets."""
