"""Shared fixtures: small random-weight transformers models (plumbing only: random weights have
near-uniform attention, so sparsity quality is judged on the real SmolLM2 weights elsewhere)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


# -- the property / fuzz suite (tests/test_fuzz.py, tests/test_families.py) --------------------------
# Shared by both files: the ``--long`` switch, the per-dtype comparison, and a ledger of case
# classes that is printed at the end of the session (the oracles: autosparse.testing.reference).

import collections  # noqa: E402
import re  # noqa: E402

# torch's own SDPA, whatever replaces F.scaled_dot_product_attention later (the hook route does).
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention

# Tolerances, relative to the output scale (max |reference|, at least 1), compared in float64.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 8e-3}


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long property/fuzz run: >= 10,000 op-level cases, every family at more shapes")


@pytest.fixture(scope="session")
def long_run(request) -> bool:
    return bool(request.config.getoption("--long"))


class FuzzLedger:
    """Counts of every fuzz case by class, with reasons, and the findings (one repro per kind)."""

    def __init__(self):
        self.cases = collections.Counter()  # suite -> cases
        self.classes = collections.Counter()  # (suite, class) -> cases
        self.dense = collections.Counter()  # reason -> cases (dense by design)
        self.fallback = collections.Counter()  # reason -> cases
        self.refused = collections.Counter()  # reason -> cases (patch time)
        self.findings = collections.Counter()  # kind -> cases
        self.examples: dict[str, str] = {}  # kind -> first repro

    def record(self, suite: str, klass: str, reason: str | None = None) -> None:
        self.cases[suite] += 1
        self.classes[(suite, klass)] += 1
        if reason is not None:
            table = {"dense": self.dense, "fallback": self.fallback, "refused": self.refused}.get(klass)
            if table is not None:
                table[_short(reason)] += 1

    def finding(self, suite: str, kind: str, repro: str) -> None:
        self.record(suite, "FINDING")
        self.findings[kind] += 1
        self.examples.setdefault(kind, repro)

    def summary(self, suites=None) -> str:
        lines = []
        for suite in sorted(self.cases):
            if suites is not None and suite not in suites:
                continue
            per = {k: n for (s, k), n in self.classes.items() if s == suite}
            lines.append(f"{suite}: {self.cases[suite]} cases, " + ", ".join(f"{k}={n}" for k, n in sorted(per.items())))
        for title, table in (("dense by design", self.dense), ("dense fallbacks", self.fallback),
                             ("refused at patch time", self.refused), ("FINDINGS", self.findings)):
            if table:
                lines.append(f"  {title}:")
                lines += [f"    {n:6d}  {reason}" for reason, n in table.most_common()]
        return "\n".join(lines)


def _short(reason: str, limit: int = 110) -> str:
    """A reason as the ledger groups it: one line, numbers (shapes, sizes) as N."""
    reason = re.sub(r"\d+", "N", " ".join(str(reason).split()))
    return reason if len(reason) <= limit else reason[:limit] + "..."


LEDGER = FuzzLedger()


def pytest_terminal_summary(terminalreporter):
    if LEDGER.cases:
        terminalreporter.section("autosparse fuzz ledger")
        terminalreporter.write_line(LEDGER.summary())
        for kind, repro in LEDGER.examples.items():
            terminalreporter.write_line(f"-- first case of finding {kind!r}:\n{repro}")


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, free_rows: torch.Tensor | None = None) -> str | None:
    """None when ``got`` equals ``want`` within ``dtype``'s tolerance (non-finite entries must be
    non-finite in both), else what differs. ``free_rows`` (bool, broadcastable to ``got.shape[:-1]``):
    rows not compared (e.g. rows whose key blocks hold a NaN the kernel may read, as torch does)."""
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    if free_rows is not None:
        free = free_rows.expand(got.shape[:-1])[..., None]
        got, want = got.masked_fill(free, 0.0), want.masked_fill(free, 0.0)
    finite_got, finite_want = torch.isfinite(got), torch.isfinite(want)
    if not torch.equal(finite_got, finite_want):
        return (f"non-finite entries differ: {int((~finite_got).sum())} got vs {int((~finite_want).sum())} expected "
                f"({int((finite_got != finite_want).sum())} positions)")
    both = finite_got & finite_want
    if not bool(both.any()):
        return None
    scale = max(float(want[both].abs().max()), 1.0)
    err = float((got[both] - want[both]).abs().max())
    if err > TOLERANCE[dtype] * scale:
        return f"max abs error {err:.3g} > {TOLERANCE[dtype]:.0e} x scale {scale:.3g}"
    return None
