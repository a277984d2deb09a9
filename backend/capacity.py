"""What this backend can take and how fast it drains: the measured drain rate and the advertisement built on it.

The gateway reads the advertisement from `GET /v1/capacity` and from the `Quotagate-Capacity` header on
every answer of the images route, so that fleet capacity is learned from the backends rather than configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CAPACITY_HEADER", "Capacity", "DrainRate"]

CAPACITY_HEADER = "Quotagate-Capacity"

# RFC 8941 decimals carry at most 12 integer digits and 3 fractional ones.
_MAX_DECIMAL = 999_999_999_999.999


class DrainRate:
    """Images finished per second of pipeline time, an exponentially weighted mean over recent batches.

    Each batch reports its own images and seconds, so the measure depends on no clock of its own; a batch
    counts as one observation whatever its size, which lets the mean follow a change within a few batches.
    """

    def __init__(self, *, weight: float = 0.3) -> None:
        if not 0 < weight <= 1:
            raise ValueError("weight must be in (0, 1]")
        self._weight = weight
        self._rate: float | None = None

    def observe(self, images: int, seconds: float) -> None:
        """Record a batch that finished `images` in `seconds`; empty or instantaneous batches carry no rate."""
        if images <= 0 or seconds <= 0:
            return
        rate = images / seconds
        if self._rate is None:
            self._rate = rate
        else:
            self._rate += self._weight * (rate - self._rate)

    @property
    def images_per_s(self) -> float:
        """The measured rate; 0.0 before the first batch."""
        return 0.0 if self._rate is None else self._rate

    def seconds_for(self, images: int) -> float | None:
        """Estimated seconds to generate `images`; None before the first measurement."""
        if self._rate is None:
            return None
        return images / self._rate


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """One reading of the backend's capacity, as advertised."""

    slots: int  # images one pipeline call runs at once
    queue_images: int  # the queue's bound, in images
    queued_images: int  # images waiting now
    running_images: int  # images of the batch running now
    images_per_s: float  # the measured drain rate
    ready: bool  # the model is loaded and warm

    def as_json(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "queue_images": self.queue_images,
            "queued_images": self.queued_images,
            "running_images": self.running_images,
            "images_per_s": self.images_per_s,
            "ready": self.ready,
        }

    def header_value(self) -> str:
        """An RFC 8941 dictionary: integers, and the rate as a decimal of at most 3 fractional digits."""
        return (
            f"slots={self.slots}, queue={self.queue_images}, queued={self.queued_images}, "
            f"running={self.running_images}, rate={_sf_decimal(self.images_per_s)}"
        )


def _sf_decimal(value: float) -> str:
    text = f"{min(max(value, 0.0), _MAX_DECIMAL):.3f}".rstrip("0")
    # A structured-field decimal needs at least one fractional digit.
    return text + "0" if text.endswith(".") else text
