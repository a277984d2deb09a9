"""What the gateway tells about itself: Prometheus metrics, logs, and the one log line per request."""
