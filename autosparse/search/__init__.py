"""The offline search: calibrate on the user's inputs, score every candidate pattern per head,
choose the cheapest under the error budget (``calibrate``), with kernel cost measured on this GPU
(``cost``), closed-form profiles for structured grids (``structural``), and end-to-end validation
that tightens a profile to a target (``validate``)."""

from autosparse.search.calibration import Calibration, SearchConfig, calibrate, record_inputs, search_profile
from autosparse.search.structural import structural_profile, tile_window
from autosparse.search.validate import fit_to_target

__all__ = ["Calibration", "SearchConfig", "calibrate", "fit_to_target", "record_inputs", "search_profile",
           "structural_profile", "tile_window"]
