"""FX graph passes for the ``torch.compile(backend="autosparse")`` backend (installed as
``autosparse.passes``). The backend itself is not part of v0; eager patching lives in
``autosparse.patch``."""
