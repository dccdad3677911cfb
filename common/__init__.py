"""Code shared by gateway and worker: queue wire format, Redis key names, models."""
