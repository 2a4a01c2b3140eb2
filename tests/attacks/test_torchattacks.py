"""torchattacks on mpd_triton models: they take images in [0, 1] and return logits, as torchattacks
and AutoAttack expect, so torchattacks' FGSM and PGD run on them unchanged and give exactly the
adversarial images of our own attacks (train/attacks.py) with the same settings.

Why bit for bit: torchattacks differentiates the batch-mean cross-entropy, we the per-image sum;
with a batch of 2^k images the two gradients differ by the exact factor 2^-k at every step of
the backward, so their signs agree. Its PGD projects as x + clamp(x_adv - x, -eps, eps), ours
as clamp(x_adv, x - eps, x + eps); the two are the same float when x_adv - x is exact, which
Sterbenz's lemma guarantees for pixels in [0.25, 0.75] and eps < 0.25 (x_adv within a factor of
two of x). Both draw the random start as torch.empty_like(x).uniform_(-eps, eps).
"""

from __future__ import annotations

import pytest
import torch

from models import SmallSNN
from mpd_triton.attacks import methods as A

torchattacks = pytest.importorskip("torchattacks", reason="torchattacks (the `test` extra) is not installed")

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def images_and_labels():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g) * 0.5 + 0.25  # 2^3 images, pixels in [0.25, 0.75]
    return x, torch.randint(0, 10, (8,), generator=g)


@pytest.fixture(scope="module")
def case():
    """An untrained small SNN whose batch-norm statistics are set from the images (one forward in
    train mode), so that every LIF layer fires in eval mode, where the attacks run."""
    torch.manual_seed(0)
    model = SmallSNN(in_channels=1, num_classes=10, image_size=8, T=2, width=4, hidden=16,
                     neuron=dict(v_th=0.2))
    x, y = images_and_labels()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # running statistics = those of this batch
        model(x)
    return model.train(), x, y  # in train mode: both attacks must switch to eval and back


def test_fgsm_matches_ours(case):
    model, x, y = case
    theirs = torchattacks.FGSM(model, eps=EPS)(x, y)
    assert model.training, "torchattacks must restore the model's mode"
    ours = A.fgsm(model, x, y, EPS)
    changed = (ours != x).float().mean()
    assert changed > 0.5, f"only {float(changed):.0%} of the pixels moved: the gradient is mostly zero"
    assert torch.equal(theirs, ours)


def test_pgd_matches_ours(case):
    model, x, y = case
    torch.manual_seed(7)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)(x, y)
    torch.manual_seed(7)
    ours = A.pgd(model, x, y, EPS, ALPHA, STEPS, random_start=True)
    assert float((ours - x).abs().max()) <= EPS + 1e-7
    assert torch.equal(theirs, ours)
    with torch.no_grad():
        model.eval()
        loss_clean = torch.nn.functional.cross_entropy(model(x), y)
        loss_adv = torch.nn.functional.cross_entropy(model(ours), y)
        model.train()
    assert loss_adv > loss_clean


def test_pgd_on_a_converted_spikingjelly_model():
    """A SpikingJelly model takes [T, B, ...] and returns [T, B, classes]: a two-line wrapper
    (repeat the image over T, mean over T) makes it a torchattacks model, before and after
    conversion, and the attack finds the same images on both."""
    pytest.importorskip("spikingjelly", reason="spikingjelly is not installed")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    import mpd_triton as mt

    class OverTime(torch.nn.Module):
        def __init__(self, net, T):
            super().__init__()
            self.net, self.T = net, T

        def forward(self, x):
            functional.reset_net(self.net)  # SpikingJelly's neurons keep state; ours do not
            return self.net(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)).mean(0)

    torch.manual_seed(0)
    net = torch.nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4),
                              neuron.LIFNode(v_threshold=0.5, surrogate_function=surrogate.ATan()),
                              layer.Flatten(), layer.Linear(4 * 8 * 8, 10))
    functional.set_step_mode(net, "m")
    x, y = images_and_labels()
    results = []
    for model in (OverTime(net, 2), OverTime(mt.from_spikingjelly(net), 2)):
        torch.manual_seed(3)
        results.append(torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS)(x, y))
    assert (results[0] != x).any() and torch.equal(results[0], results[1])
