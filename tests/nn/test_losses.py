import pytest
import torch
import torch.nn.functional as F

from retrolm.nn.losses import linear_cross_entropy


@pytest.mark.parametrize("block", [3, 1024])
def test_linear_cross_entropy_equals_plain_loss_and_grads(block):
    torch.manual_seed(0)
    h = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 2] = labels[1, 6] = -100
    loss = linear_cross_entropy(h, w, labels, block=block)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(loss, (h, w))
    g2 = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_close_to_fp32():
    torch.manual_seed(1)
    h = torch.randn(64, 32)
    w = torch.randn(100, 32) * 0.1
    labels = torch.randint(0, 100, (64,))
    ref = F.cross_entropy(h @ w.t(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
