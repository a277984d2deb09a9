"""The diffusion inference service behind the quotagate gateway; knows nothing of plans beyond a priority."""

from backend._offline import configure as _configure_offline

# Before torch, diffusers or transformers can be imported by any backend module: never reach a model hub.
_configure_offline()
