"""Installed as a user installs it: the wheel built from this checkout, installed into a fresh virtual
environment outside the repository (reusing this environment's torch and numpy, no network), used from
another folder: build a model, train a step with MPD-SGR, load a model.pt that train.run wrote, and
evaluate it with FGSM and PGD."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # building and installing the wheel: a minute on a 2-core CPU

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: the files pyproject.toml packages (a copy, so the checkout gets no build/).
SOURCES = ("pyproject.toml", "README.md", "mpd_triton")


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(root / "dist"), str(src)], cwd=root)
    (wheel,) = (root / "dist").glob("mpd_triton-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    # torch, numpy and triton from this environment, after the venv's own site-packages (a path entry:
    # the editable install's finder of this environment is not loaded there)
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    # a model.pt as train.run writes it (the bundled data subset, a few images, one epoch)
    run = root / "run"
    _run([sys.executable, "-m", "train.run", "--train-limit", "128", "--test-limit", "64", "--epochs", "1",
          "--eval-attacks", "", "--no-compare", "--eta", "1", "--width", "4", "--out", str(run)], cwd=REPO)
    (model_pt,) = run.glob("*/model.pt")
    work = root / "work"
    work.mkdir()
    return {"python": python, "wheel": wheel, "model": model_pt, "work": work}


def test_wheel_installs_and_works_outside_the_repository(installed):
    script = textwrap.dedent(f"""
        import sys
        import torch
        from torch import nn
        import mpd_triton as mt

        assert "site-packages" in mt.__file__ and {str(REPO)!r} not in mt.__file__, mt.__file__
        assert "models" not in sys.modules and "train" not in sys.modules  # nothing of the checkout
        model = mt.models.build("small", in_channels=1, num_classes=10, image_size=28, T=2, width=4, hidden=16)
        reg = mt.MPDSGR(model, eta=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(model(x), y) + reg()
        loss.backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        from pathlib import Path
        assert (Path(mt.__file__).parent / "kernels" / "lif_cpu.c").is_file()  # the C kernels' source came along
        print("backend", mt.lif(torch.randn(2, 3, 4, 5, 5)).dtype, mt.kernels.cpu.unavailable_reason())
        trained = mt.models.load({str(installed["model"])!r})
        record = mt.models.read({str(installed["model"])!r})
        out = trained(torch.rand(3, 1, 28, 28))
        print("loaded", record["model_spec"]["model"], tuple(out.shape), record["provenance"]["commit"] is not None)
        x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
        result = mt.attacks.evaluate(trained, x, y, eps=[8 / 255], attacks=["fgsm", "pgd"], steps=2, progress=False)
        print("evaluated", sorted(result["accuracy"]), result["n"], len(result["checks"]) > 0)
        """)
    done = _run([str(installed["python"]), "-c", script], cwd=installed["work"])
    lines = done.stdout.splitlines()
    assert lines[-2] == "loaded small (3, 10) True"
    assert lines[-1] == "evaluated ['fgsm', 'pgd'] 6 True"
    assert lines[0].startswith("backend torch.float32")


def test_the_readme_examples_run_from_outside_the_repository(installed):
    """Each Python example of the README, run as written (the device chosen at run time where it names one)
    by the installed library, from a folder outside the checkout."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        script = installed["work"] / f"readme_{i}.py"
        script.write_text(code)
        done = subprocess.run([str(installed["python"]), str(script)], cwd=installed["work"], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"README example {i} failed outside the repository:\n{done.stderr[-3000:]}"
