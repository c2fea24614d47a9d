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


@pytest.mark.parametrize("block", [1, 4, 1000])
def test_linear_cross_entropy_blocks_and_ignored_rows(block):
    """Row blocks (forward) and vocabulary blocks (backward) of every size, labels at the
    first and last vocabulary ids, all-ignored rows: the plain loss and its gradients."""
    torch.manual_seed(2)
    h = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 12, 5, -100, 12, 0, -100, 7, 3])
    loss = linear_cross_entropy(h, w, labels, block=block)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_bf16_gradients_close_to_fp32():
    torch.manual_seed(3)
    h = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 300, (40,))
    ref = F.cross_entropy(h @ w.t(), labels)
    g_ref = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, block=16)
    g = torch.autograd.grad(loss, (h, w))
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 * b.abs().max().item())


@pytest.mark.parametrize("block", [3, 1024])
def test_linear_cross_entropy_per_token_equals_plain_and_grads(block):
    """reduction='none' with any upstream weights: values and gradients of the plain loss."""
    torch.manual_seed(1)
    h = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[1, 3] = -100
    per = linear_cross_entropy(h, w, labels, block=block, reduction="none")
    ref = F.cross_entropy((h @ w.t()).transpose(1, 2), labels, ignore_index=-100, reduction="none")
    assert per.shape == (2, 7) and per[1, 3] == 0
    torch.testing.assert_close(per, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(2, 7, dtype=torch.float64)
    g1 = torch.autograd.grad((per * up).sum(), (h, w))
    g2 = torch.autograd.grad((ref * up).sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="sum")
