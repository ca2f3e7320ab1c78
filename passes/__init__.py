"""FX graph passes of the ``torch.compile(model, backend="autosparse")`` backend (installed as
``autosparse.passes``; the backend itself is ``autosparse.backend``).

``sdpa``: find every scaled-dot-product attention call of a Dynamo graph, normalised
(``find_sdpa``), and replace the served ones with ``torch.ops.autosparse.attention`` (``rewrite_sdpa``).
"""

from .sdpa import SdpaCall, find_sdpa, rewrite_sdpa

__all__ = ["SdpaCall", "find_sdpa", "rewrite_sdpa"]
