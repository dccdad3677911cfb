"""Worker process: takes jobs from Redis, runs them on an inference engine, publishes events."""
