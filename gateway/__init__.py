"""Gateway process: the public gRPC API in front of the Redis job queue."""
