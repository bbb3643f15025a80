"""Checks on the project as a whole: the linter, the documentation site, the package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*command: object, cwd: Path = REPO, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def test_the_code_base_is_clean_under_ruff() -> None:
    """pyproject.toml's [tool.ruff]: lint rules and formatting."""
    lint = run(sys.executable, "-m", "ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatting = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert formatting.returncode == 0, "run `.venv/bin/ruff format .`:\n" + formatting.stdout + formatting.stderr


def test_the_documentation_site_builds_without_a_warning(tmp_path: Path) -> None:
    """mkdocs.yml is strict: a broken link or anchor, a page left out of the navigation, or an
    API reference that does not resolve (mkdocstrings) fails the build."""
    result = run(
        sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", tmp_path / "site", NO_MKDOCS_2_WARNING="1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SoftAdam", "EtaScheduler", "create_optimizer_and_scheduler", "FairseqSoftAdamConfig"):
        assert name in api, name
    assert api.count('class="arithmatex"') > 10, "the docstrings' math is not rendered"


def _source_files() -> list[str]:
    """What a clean checkout holds: tracked files, and new ones git does not ignore."""
    listing = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    assert listing.returncode == 0, listing.stderr
    return [name for name in listing.stdout.split("\0") if name and (REPO / name).is_file()]


def test_the_wheel_installs_with_only_torch_and_ninja_and_steps_outside_the_repository(tmp_path: Path) -> None:
    import torch

    source = tmp_path / "source"
    for name in _source_files():  # building writes build/ and *.egg-info beside the sources
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    dist = tmp_path / "dist"
    built = run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", dist, source)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("softadam_nlp-*.whl")
    (sdist,) = dist.glob("softadam_nlp-*.tar.gz")
    checked = run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "softadam_nlp/csrc/fused_softadam_cpu.cpp" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert not any(name.startswith(("tests/", "scripts/", "hf_examples/", "results/")) for name in names)

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    pins = ["-c", REPO / "requirements" / "constraints.txt"]
    installed = run(
        python, "-m", "pip", "install", "--quiet", *pins, f"torch=={torch.__version__}", "ninja", timeout=900
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    installed = run(python, "-m", "pip", "install", "--quiet", *pins, wheel)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    listed = run(python, "-m", "pip", "list", "--format", "freeze").stdout
    extra = {line.split("==")[0].lower() for line in listed.split()} & {"fairseq-fixed", "transformers", "deepspeed"}
    assert not extra, f"the wheel pulled {extra}"

    code = """
        import sys, torch
        import softadam_nlp
        from softadam_nlp import SoftAdam
        from softadam_nlp.data import SHARED_DATA, data_roots
        assert "site-packages" in softadam_nlp.__file__, softadam_nlp.__file__
        assert SHARED_DATA is None and data_roots() == [], data_roots()
        w = torch.nn.Parameter(torch.ones(4, 3))
        opt = SoftAdam([w], lr=0.1, fused=True)  # the kernel's source comes with the wheel
        w.grad = torch.full((4, 3), 0.5)
        opt.step()
        assert bool((w < 1).all()) and w in opt._kept_means
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"fairseq", "transformers", "datasets", "deepspeed"})
        print("version", softadam_nlp.__version__, "loaded", loaded)
    """
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "SOFTADAM_DATA_DIR", "SOFTADAM_NO_FUSED", "VIRTUAL_ENV")
    }
    stepped = subprocess.run(
        [str(python), "-c", "\n".join(line[8:] for line in code.splitlines())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
    )
    assert stepped.returncode == 0, stepped.stdout + stepped.stderr
    assert "loaded []" in stepped.stdout, stepped.stdout
