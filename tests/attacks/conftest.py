"""Shared by the attack tests: a small SNN trained here (test_assg.py and test_attacks_validity.py)."""

import pytest
import torch
from torch import nn

import mpd_triton as mt
from models import build_model
from train.data import load_dataset


@pytest.fixture(scope="module")
def trained():
    """A small MPD-SGR SNN trained here for two epochs on 3,000 images of the bundled Fashion-MNIST
    subset (about 6 s), and 200 test images."""
    train, test, _ = load_dataset("fmnist-subset", None)
    x_train, y_train = train.images[:3000].float().div(255.0), train.labels[:3000]
    torch.manual_seed(0)
    model = build_model("small", in_channels=1, image_size=28, num_classes=10, width=8, hidden=32, T=4,
                        neuron=dict(backend="torch"))
    reg = mt.MPDSGR(model, eta=0.01)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for epoch in range(2):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x_train), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]) + reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
    reg.remove()
    model.eval()
    return model, test.images[:200].float().div(255.0), test.labels[:200]
