"""Serving one attention call: the op the capture routes call (``serve``), how a call is classified
(``classify``), the call plans it runs on and the layer registry (``plan``), the dense answer
(``dense``), and what a patched model carries while it runs (``state``)."""

from autosparse.runtime.dense import ORIGINAL_SDPA, empty_output
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.plan import (CallPlan, LayerPlan, call_plan, clear_call_plans, is_registered, plan_of,
                                     register, unregister)
from autosparse.runtime.serve import GUARD_REASON, HOST_SIDE_TAGS, attention, count_unserved, serve
from autosparse.runtime.state import AttentionStats, CallContext, PatchState

__all__ = ["GUARD_REASON", "HOST_SIDE_TAGS", "ORIGINAL_SDPA", "AttentionStats", "CallContext", "CallPlan", "HeadSet",
           "LayerPlan", "PatchState", "attention", "call_plan", "clear_call_plans", "count_unserved", "empty_output",
           "is_registered", "plan_of", "register", "serve", "unregister"]
