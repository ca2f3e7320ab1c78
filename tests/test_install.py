"""A fresh checkout is usable as it is: Python started in the repository root (``python -m pytest``
puts it first on sys.path) imports transformers, which imports Hugging Face's ``kernels`` package,
although the repository's top-level ``kernels/`` folder (installed as ``autosparse.kernels``) has
the same name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_transformers_imports_with_the_repo_root_first_on_sys_path():
    out = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
               "from transformers import LlamaConfig, LlamaForCausalLM; import kernels; print(kernels.__file__)")
    assert Path(out.strip()).parent != ROOT / "kernels"  # the installed package, not this folder


def test_autosparse_kernels_is_this_folder():
    out = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import transformers, autosparse.kernels as k; "
               "print(k.__file__); print(k.block_sparse_attention.__module__)")
    path, module = out.split()
    assert Path(path) == ROOT / "kernels" / "__init__.py" and module == "autosparse.kernels.block_sparse_op"


def test_without_an_installed_kernels_package_the_folder_shadows_nothing():
    """Where no other ``kernels`` is installed (transformers without Hugging Face's kernels), the
    name gives an empty namespace package, as a plain folder would (transformers reads one without
    ``__file__`` as "not installed"), instead of failing the import."""
    code = (f"import sys; sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p]; "
            "import kernels; print(getattr(kernels, '__file__', None), list(kernels.__path__))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "[]"]
