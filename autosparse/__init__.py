"""autosparse: per-head sparse attention for off-the-shelf transformers, without retraining.

    profile = autosparse.Profile.load("profiles/smollm2-135m.json")
    autosparse.patch_model(model, profile)      # in place; autosparse.unpatch_model(model) undoes it
    print(autosparse.stats(model))              # calls served sparse / dense, with reasons

    calibration = autosparse.calibrate(model, inputs, autosparse.SearchConfig(budget=0.1))   # offline
    calibration.profile().save("my_profile.json")

    autosparse.patch_model(pipe.transformer, "profiles/wan2.1-t2v-1.3b-480p.json")   # diffusers DiTs too

Data flows one way: capture -> identify the layer -> look up its patterns -> classify the call -> call plan
(layout, prepared launch) -> kernel; docs/architecture.md names the module that owns each step.
"""

from autosparse import _moved
from autosparse._version import __version__
from autosparse.balance import HeadBalance, balance_heads
from autosparse.guard import GuardConfig
from autosparse.layout import BlockLayout
from autosparse.patch import AttentionStats, patch_model, stats, unpatch_model
from autosparse.patterns import (BlockCdf, BlockGeometry, Blocks, BlockTopK, Dense, DynamicPattern, Global, GridPattern,
                                 Neighborhood, Pattern, SinkLocal, Spatial, Stripes, Temporal, TokenGeometry, Union,
                                 VerticalSlash, Window, default_tile, pattern_from_spec, register_pattern)
from autosparse.profile import LayerProfile, Profile, StepRange
from autosparse.runtime.decode import PageTopK, StaticDecode
from autosparse.search import (Calibration, SearchConfig, calibrate, fit_to_target, record_inputs, search_profile,
                               structural_profile, tile_window)

__all__ = [
    "AttentionStats",
    "BlockCdf",
    "BlockTopK",
    "BlockGeometry",
    "BlockLayout",
    "Blocks",
    "Calibration",
    "Dense",
    "DynamicPattern",
    "Global",
    "GridPattern",
    "GuardConfig",
    "HeadBalance",
    "LayerProfile",
    "Neighborhood",
    "PageTopK",
    "Pattern",
    "Profile",
    "SearchConfig",
    "SinkLocal",
    "Spatial",
    "StaticDecode",
    "StepRange",
    "Stripes",
    "Temporal",
    "TokenGeometry",
    "Union",
    "VerticalSlash",
    "Window",
    "__version__",
    "balance_heads",
    "calibrate",
    "default_tile",
    "fit_to_target",
    "patch_model",
    "pattern_from_spec",
    "record_inputs",
    "register_pattern",
    "search_profile",
    "stats",
    "structural_profile",
    "tile_window",
    "unpatch_model",
]

_moved.install()


def __getattr__(name: str):
    return _moved.attribute(name)
