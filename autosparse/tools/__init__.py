"""The CLI's commands beyond the search and what they need: the CPU demo, ``bench``, the profile
heatmap, perplexity, model loading without a hub (``zoo``), and the one timing rule every
benchmark uses (``timing``)."""
