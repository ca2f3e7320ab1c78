"""What tests, examples and benchmarks share: real-shaped random-weight diffusion transformers
(``dits``) and the dense reference attention (``reference``). Nothing that serves a model imports it."""
