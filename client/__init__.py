"""The thin gRPC client of the isekai ensemble."""
