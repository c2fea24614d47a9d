import torch
from torch import nn

from retrolm.nn import KVCache, MultiHeadAttention, RotaryEmbedding
from retrolm.wrapper import AutoregressiveWrapper


class TinyLM(nn.Module):
    """A one-layer causal LM implementing the wrapper's cache protocol."""

    def __init__(self, vocab=11, dim=16, with_aux=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = MultiHeadAttention(dim, heads=2, dim_head=8, causal=True)
        self.rot = RotaryEmbedding(8)
        self.out = nn.Linear(dim, vocab)
        self.with_aux = with_aux
        self.max_seq_len = 64

    def init_cache(self, batch_size):
        return KVCache()

    def forward(self, x, cache=None):
        start = cache.length if cache is not None else 0
        r = self.rot(torch.arange(start, start + x.shape[1]))
        h = self.emb(x)
        logits = self.out(h + self.attn(h, cache=cache, q_rotary=r, k_rotary=r))
        return (logits, torch.tensor(0.5)) if self.with_aux else logits


class NoCacheLM(TinyLM):
    init_cache = None

    def __getattribute__(self, name):
        if name == "init_cache":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_loss_ignores_minus_100_not_token_zero():
    torch.manual_seed(0)
    w = AutoregressiveWrapper(TinyLM())
    x = torch.zeros(2, 9, dtype=torch.long)  # all token 0: must still carry loss
    assert w(x, return_loss=True) > 0
    w_aux = AutoregressiveWrapper(TinyLM(with_aux=True))
    w_aux.net.load_state_dict(w.net.state_dict())
    torch.testing.assert_close(w_aux(x, return_loss=True), w(x, return_loss=True) + 0.5)


def test_cached_greedy_generation_equals_full_forward_greedy():
    torch.manual_seed(1)
    net = TinyLM()
    prompt = torch.randint(0, 11, (2, 5))
    cached = AutoregressiveWrapper(net).generate(prompt, 12, temperature=0)
    nocache = NoCacheLM()
    nocache.load_state_dict(net.state_dict())
    full = AutoregressiveWrapper(nocache).generate(prompt, 12, temperature=0)
    assert torch.equal(cached, full)
    assert cached.shape == (2, 12)


def test_generation_stops_at_eos():
    torch.manual_seed(2)
    net = TinyLM()
    with torch.no_grad():
        net.out.bias.fill_(-10)
        net.out.bias[3] = 10  # always predicts 3
    out = AutoregressiveWrapper(net).generate(torch.tensor([1, 2]), 20, eos_token=3, temperature=0)
    assert out.tolist() == [3]


def test_random_truncation_and_mask():
    torch.manual_seed(3)
    w = AutoregressiveWrapper(TinyLM())
    x = torch.randint(0, 11, (2, 10))
    loss = w(x, return_loss=True, randomly_truncate_sequence=True)
    assert loss.isfinite()
    loss.backward()
