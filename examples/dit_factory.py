"""Calibration factories for ``autosparse profile --factory examples.dit_factory:wan``.

A factory is any function with no arguments that returns ``(model, calibration inputs)``. For a
diffusion transformer the inputs are the keyword arguments of one transformer call each, at several
denoising steps in order (the step is counted from the timestep). With a real pipeline, record them
from the pipeline's own calls::

    from autosparse.search.calibration import record_inputs

    def wan_pipeline():
        pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
        generate = lambda prompt: pipe(prompt, num_frames=81, num_inference_steps=50)
        calibration = record_inputs(pipe.transformer, lambda: generate("a fox in the snow"))
        heldout = record_inputs(pipe.transformer, lambda: generate("a city street at night"))
        return pipe.transformer, calibration, heldout

Here: the tiny random-weight Wan of ``autosparse.testing.dits`` (plumbing only: random weights attend
almost uniformly, so what the search finds says nothing about a real model).
"""

from autosparse.testing.dits import build_dit


def wan():
    """(model, calibration inputs at 4 steps, held-out inputs: another generation's 4 steps)."""
    dit = build_dit("wan", frames=2, height=32, width=96)
    steps = (900.0, 700.0, 500.0, 300.0)
    return dit.model, [dit.inputs(timestep=t) for t in steps], [dit.inputs(timestep=t) for t in steps]
