"""autosparse: per-head sparse attention for off-the-shelf transformers, without retraining.

    profile = autosparse.Profile.load("profiles/smollm2-135m.json")
    autosparse.patch_model(model, profile)      # in place; autosparse.unpatch_model(model) undoes it
    print(autosparse.stats(model))              # calls served sparse / dense, with reasons

Data flows one way: capture (patch) -> identify (layer) -> look up (profile) -> layout -> kernel.
"""

__version__ = "0.1.0"

from autosparse.layout import BlockLayout
from autosparse.patch import AttentionStats, patch_model, stats, unpatch_model
from autosparse.patterns import Blocks, BlockGeometry, Dense, Global, Pattern, SinkLocal, Window, pattern_from_spec
from autosparse.profile import LayerProfile, Profile

__all__ = [
    "AttentionStats",
    "BlockGeometry",
    "BlockLayout",
    "Blocks",
    "Dense",
    "Global",
    "LayerProfile",
    "Pattern",
    "Profile",
    "SinkLocal",
    "Window",
    "__version__",
    "patch_model",
    "pattern_from_spec",
    "stats",
    "unpatch_model",
]
