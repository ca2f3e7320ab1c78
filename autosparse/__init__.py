"""autosparse: per-head sparse attention for off-the-shelf transformers, without retraining.

    profile = autosparse.Profile.load("profiles/smollm2-135m.json")
    autosparse.patch_model(model, profile)      # in place; autosparse.unpatch_model(model) undoes it
    print(autosparse.stats(model))              # calls served sparse / dense, with reasons

    calibration = autosparse.calibrate(model, inputs, autosparse.SearchConfig(budget=0.1))   # offline
    calibration.profile().save("my_profile.json")

    autosparse.patch_model(pipe.transformer, "profiles/wan2.1-t2v-1.3b-480p.json")   # diffusers DiTs too

Data flows one way: capture (patch) -> identify (layer) -> look up (profile) -> layout -> kernel.
"""

__version__ = "0.1.0"

from autosparse.dynamic import BlockCdf, BlockTopK, VerticalSlash
from autosparse.guard import GuardConfig
from autosparse.grid import GridPattern, Neighborhood, Spatial, Stripes, Temporal
from autosparse.layout import BlockLayout
from autosparse.patch import AttentionStats, patch_model, stats, unpatch_model
from autosparse.patterns import (Blocks, BlockGeometry, Dense, Global, Pattern, SinkLocal, Union, Window,
                                 pattern_from_spec, register_pattern)
from autosparse.profile import LayerProfile, Profile, StepRange
from autosparse.search import Calibration, SearchConfig, calibrate, record_inputs, search_profile
from autosparse.structural import structural_profile, tile_window
from autosparse.tokens import TokenGeometry, default_tile
from autosparse.validate import fit_to_target

__all__ = [
    "AttentionStats",
    "BlockCdf",
    "BlockTopK",
    "BlockGeometry",
    "BlockLayout",
    "Blocks",
    "Calibration",
    "Dense",
    "Global",
    "GridPattern",
    "GuardConfig",
    "LayerProfile",
    "Neighborhood",
    "Pattern",
    "Profile",
    "SearchConfig",
    "SinkLocal",
    "Spatial",
    "StepRange",
    "Stripes",
    "Temporal",
    "TokenGeometry",
    "Union",
    "VerticalSlash",
    "Window",
    "__version__",
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
