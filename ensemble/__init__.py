"""The pipeline's own logic as plain, tested Python. No Triton import here."""
