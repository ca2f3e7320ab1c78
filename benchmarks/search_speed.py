"""How long the search takes on a diffusion transformer: calibrate + choose, end to end.

    PYTHONUNBUFFERED=1 python3 benchmarks/search_speed.py           # H200: Wan2.1-1.3B-shaped, 480p/81f, bf16
    python3 benchmarks/search_speed.py --smoke                      # CPU: tiny Wan, seconds

Random weights (near-uniform attention: the chosen patterns mean nothing, the time does): the
transformer's inputs at ``--steps`` denoising steps are the calibration set; ``search_profile``
observes every self-attention call (30 layers x steps), scores the tile-stepped neighborhood
candidates on ``--rows`` sampled query rows and picks per head under ``--budget``. Prints the wall
time, the dense forward time for scale, and the chosen block densities.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from autosparse.testing.dits import build_dit  # noqa: E402
from autosparse.search.calibration import SearchConfig, search_profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dit = build_dit("wan", "tiny" if args.smoke else "real", device=device,
                    dtype=torch.float32 if args.smoke else torch.bfloat16,
                    **({"frames": 2, "height": 32, "width": 96} if args.smoke else {}))
    timesteps = torch.linspace(950.0, 300.0, args.steps).tolist()
    inputs = [dit.inputs(timestep=t) for t in timesteps]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        dit.model(**inputs[0])
        sync()
        begin = time.perf_counter()
        dit.model(**inputs[0])
        sync()
        forward_s = time.perf_counter() - begin
    config = SearchConfig(budget=args.budget, query_rows=args.rows,
                          **({"block_size": (16, 32)} if args.smoke else {}))
    begin = time.perf_counter()
    profile = search_profile(dit.model, inputs, config, progress=False)
    sync()
    search_s = time.perf_counter() - begin
    densities = [m["density"] for entry in profile.layers.values() for m in entry.measured]
    costs = [m["cost"] for entry in profile.layers.values() for m in entry.measured]
    sparse = sum(d < 1.0 for d in densities)
    print(f"{dit.description}: {len(profile.layers)} layers x {args.steps} steps, {args.rows} query rows per call")
    print(f"candidates: {profile.search['candidates']}")
    print(f"search {search_s:.1f} s (calibration {profile.search['calibration']['seconds']:.1f} s), "
          f"dense forward {forward_s * 1e3:.0f} ms; {sparse}/{len(densities)} heads sparse, "
          f"mean density {sum(densities) / len(densities):.3f}, mean cost {sum(costs) / len(costs):.3f} of dense "
          f"({profile.search['cost']}); device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
