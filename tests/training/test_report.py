"""Reports: membrane samples come from an unchanged forward and match the recorded statistics."""

import torch

import mpd_triton as mt
from models import build_model
from train.report import membrane_samples


def test_membrane_samples_leave_the_forward_alone_and_match_the_statistics():
    torch.manual_seed(0)
    model = build_model("small", in_channels=1, image_size=12, num_classes=10, width=4, hidden=16, T=3,
                        neuron=dict(backend="torch"))
    with torch.no_grad():
        model.train()
        model(torch.rand(64, 1, 12, 12))  # BatchNorm statistics from real batches
    model.eval()
    x = torch.rand(32, 1, 12, 12)
    reg = mt.MPDSGR(model, eta=0.0)
    with torch.no_grad():
        logits = model(x)
    recorded = [layer.mpd_records[0] for layer in reg.layers]
    samples = membrane_samples(model, x, max_per_layer=10**9)
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # the hooks were removed and changed nothing
    for (mean, _var), s in zip(recorded, samples):
        u = torch.from_numpy(s["u"]).double()
        # every element of the layer was kept: the pooled mean is the mean of the per-(t, c) means
        assert abs(float(u.mean()) - float(mean.double().mean())) < 1e-4
