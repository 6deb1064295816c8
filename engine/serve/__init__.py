"""gRPC service (`cones2-engine serve`)."""
