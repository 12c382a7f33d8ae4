"""Errors raised by the planners; all are `ValueError`s so a CLI can report them as user mistakes."""


class SpecError(ValueError):
    """A spec (cluster, GPU, model, workload) is invalid; the message names the field and the allowed values."""


class PlanningError(ValueError):
    """No plan satisfies the request; the message names the binding constraint."""
