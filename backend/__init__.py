"""The diffusion inference service behind the quotagate gateway; knows nothing of plans beyond a priority.

Request flow: app (HTTP, bounded body) -> validation (frozen GenerationRequest) -> batcher (queue, priority
with aging, backpressure) -> one inference thread -> pipeline (diffusers) -> PNGs back to each request.

HTTP contract:
  POST /v1/images/generations  OpenAI Images API: prompt, n, size, response_format="b64_json", model,
                               plus seed and steps; header X-Quotagate-Priority: <int> (0..100, else 0)
  GET  /v1/models, /healthz, /readyz (503 until the model is loaded and warm), /metrics
  Errors: {"error": {"message", "type", "param", "code"}}; see backend.errors for the status mapping.
"""

from backend._offline import configure as _configure_offline

# Before torch, diffusers or transformers can be imported by any backend module: never reach a model hub.
_configure_offline()
