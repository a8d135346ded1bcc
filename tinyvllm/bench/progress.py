"""A one-line progress bar on stderr (tinyvllm has no tqdm dependency)."""
import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 30, unit: str = "req"):
        self.total, self.label, self.enabled, self.width, self.unit = total, label, enabled, width, unit
        self.done, self.start = 0, time.monotonic()
        self._draw()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        fill = self.width * self.done // max(self.total, 1)
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total}"
                         f" {rate:.2f} {self.unit}/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
