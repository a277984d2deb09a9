"""The way to the image services: the gateway's own HTTP/1.1 client and the forwarder that picks an upstream."""
