"""A tqdm progress bar on the main process showing the loss terms and images/s."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool, total: int, start: int, epoch: int,
                 phase: str = "main") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            label = f"epoch {epoch + 1}" if phase == "main" else f"{phase} epoch {epoch + 1}"
            self.bar = tqdm(
                total=total, initial=start, desc=label, leave=False,
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
            )

    def update(self, terms: dict[str, float] | None, images_per_s: float) -> None:
        """Advance one step; new loss values and speed only on log steps (``terms`` not None)."""
        if self.bar is None:
            return
        self.bar.update(1)
        if terms is None:
            return
        shown = {k: f"{v:.3f}" for k, v in terms.items()}
        shown["img/s"] = f"{images_per_s:.0f}"
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
