"""What tests share that is not a fixture: the key secret, quota files, processes, a stub image service."""
