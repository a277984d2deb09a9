"""A reference model of one brownout rule, written from its definition rather than from its code.

A rule applies once the reads of its line's wait since it last changed end in a run of reads over the
threshold spanning `for_s` seconds (first read to last), and lifts once they end in such a run of
reads at or under it. Unknown waits are not reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RuleModel:
    waits_over: float
    for_s: float
    applied: bool = False
    reads: list[tuple[float, bool]] = field(default_factory=list)  # (when, over?) since the last change

    def read(self, wait: float | None, now: float) -> None:
        if wait is None:
            return
        self.reads.append((now, wait > self.waits_over))
        run = self._run()
        if run and now - run[0][0] >= self.for_s:
            self.applied = not self.applied
            self.reads.clear()

    @property
    def since(self) -> float | None:
        """When the run of reads against the rule's state began; None if the last read agreed with it."""
        run = self._run()
        return run[0][0] if run else None

    def _run(self) -> list[tuple[float, bool]]:
        """The reads at the end that are all against the state (over while lifted, under while applied)."""
        run: list[tuple[float, bool]] = []
        for when, over in reversed(self.reads):
            if over == self.applied:
                break
            run.insert(0, (when, over))
        return run

    def copy(self) -> RuleModel:
        return RuleModel(self.waits_over, self.for_s, self.applied, list(self.reads))
