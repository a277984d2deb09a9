"""The way to the image services: the gateway's own HTTP/1.1 client, the forwarder that picks an upstream, and
the watcher that learns what each upstream can take."""
