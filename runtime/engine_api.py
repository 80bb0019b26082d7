"""What the serving side needs of an engine: the typed seam between the scheduler, the
model manager and the API on one side and `runtime.engine.Engine` (PyTorch VITS) on the
other. Defined here, without torch, so those modules type their engine without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from .engine import SynthesisRequest
    from .frontend import TextFrontend


class SynthesisEngine(Protocol):
    sample_rate: int
    frontend: "TextFrontend"

    @property
    def device(self) -> str: ...

    @property
    def can_overtake(self) -> bool:
        """Whether express work pauses a batch in progress instead of waiting for it."""
        ...

    def speaker_id(self, speaker: int | str | None) -> int: ...

    def describe_voice(self) -> dict[str, Any]: ...

    def synthesize_batch(self, requests: Sequence["SynthesisRequest"], express: bool = False) -> list[np.ndarray]: ...

    def synthesize_progressive(self, request: "SynthesisRequest", on_first_piece: Callable[[np.ndarray], None],
                               express: bool = False) -> np.ndarray: ...

    def close(self) -> None: ...
