"""isekai's benchmark: ``python -m bench`` (``make bench``). See README "Performance" and ``bench/cli.py``."""
