"""--compile of train.run and train.eval: when it compiles, full batches only, no recompilation
for a partial batch, and both command lines end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import mpd_triton as mt
from models import build_model
from mpd_triton.attacks.evaluation import EvalSettings
from train import compiling
from train.checkpoint import save_checkpoint
from train.eval import evaluation_passes
from train.eval import main as eval_main
from train.run import main as run_main

pytestmark = pytest.mark.skipif(mt.cpu_kernels_unavailable() is not None and not torch.cuda.is_available(),
                                reason="the compiled runs use the fused kernels")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_should_compile():
    assert compiling.should_compile(True, 0) == (True, "--compile")
    assert compiling.should_compile(False, 10**9) == (False, "--no-compile")
    on, why = compiling.should_compile(None, compiling.COMPILE_MIN_STEPS)
    assert on and "auto" in why
    off, why = compiling.should_compile(None, compiling.COMPILE_MIN_STEPS - 1)
    assert not off and "would not pay" in why and "training steps" in why
    _, why = compiling.should_compile(None, 5, unit="forward-backward passes")
    assert why.startswith("auto: 5 forward-backward passes <")


def _small_model():
    torch.manual_seed(0)
    return build_model("small", in_channels=1, num_classes=4, image_size=8, T=2, width=4, hidden=8)


def test_full_batches_compiled_partial_batch_eager_without_recompiling(monkeypatch):
    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(compiling.torch, "compile", lambda model: real_compile(model, backend=counter))
    model = _small_model()
    wrapped = compiling.BatchCompiled(model, batch_size=4)
    assert list(wrapped.modules())[1:] == list(model.modules()), "the model is the wrapper's only submodule"
    x = torch.rand(6, 1, 8, 8)
    for batch in (x[:4], x[2:6], x[:3], x[:4]):  # two full batches, a partial one, a full one again
        out = wrapped(batch.requires_grad_(False))
        torch.testing.assert_close(out, model(batch), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "the partial batch must not compile a second graph"


def test_evaluation_passes_counts_the_attack_budget():
    settings = EvalSettings(attacks=["fgsm", "pgd", "gaussian"], eps=[0.01, 0.03], steps=7, gradients=["own", "bptr"],
                            batch_size=10)
    assert evaluation_passes(settings, 105) == 10 * 2 * (1 * 2 + 7 * 2 + 1)


@pytest.mark.slow
def test_train_run_with_compile_end_to_end(tmp_path, capsys):
    code = run_main(["--train-limit", "96", "--test-limit", "64", "--epochs", "1", "--batch-size", "32",
                     "--eval-attacks", "", "--no-compare", "--eta", "0.1", "--compile", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "torch.compile: on (--compile)" in printed
    report = json.loads((tmp_path / "mpd" / "report.json").read_text())
    assert report["config"]["compile"] is True and report["clean_acc"] > 0


@pytest.mark.slow
def test_train_eval_with_compile_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    spec = {"model": "small", "in_channels": 1, "num_classes": 10, "image_size": 28, "T": 2, "encoding": "direct",
            "neuron": {}, "mean": [0.286], "std": [0.353], "data": "fmnist-subset"}
    model = build_model("small", **{k: v for k, v in spec.items() if k not in ("model", "data")})
    path = tmp_path / "a" / "model.pt"
    save_checkpoint(path, {"run": "plain", "eta": 0.0, "config": {}, "model": model.state_dict(), "model_spec": spec})
    code = eval_main(["--checkpoint", str(path), "--attacks", "fgsm", "--eps", "8/255", "--limit", "10",
                      "--batch-size", "4", "--no-large-eps-check", "--compile", "--out", str(tmp_path / "eval")])
    assert code == 0
    assert "torch.compile: on (--compile)" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]["a"]
    assert result["n"] == 10  # two full batches compiled, the last two images eagerly


def test_channels_last_default_and_same_results():
    assert compiling.use_channels_last(None, torch.device("cpu"))
    assert not compiling.use_channels_last(None, torch.device("cuda"))
    assert compiling.use_channels_last(True, torch.device("cuda")) and not compiling.use_channels_last(False, torch.device("cpu"))
    model = _small_model()
    x = torch.rand(3, 1, 8, 8)
    expected = model(x)
    fast = compiling.to_memory_format(_small_model(), True)
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
