"""Keep the Hugging Face libraries off the network; must run before they are imported."""

from __future__ import annotations

import os

_SETTINGS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Silences the notice about the missing torchvision, which nothing here needs.
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


def configure() -> None:
    """Set the offline environment, forcing the values: a model hub must never be reached."""
    os.environ.update(_SETTINGS)
