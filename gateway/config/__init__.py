"""What the operator configures: the quota file, the environment settings, and reloading the file while serving."""
