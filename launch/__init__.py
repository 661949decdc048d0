"""Cloud TPU launch scripts (not part of the installed package): see launch/README.md."""
