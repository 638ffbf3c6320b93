"""The page (``isekai web``): a small FastAPI app with one static page, a client of Triton over gRPC."""
