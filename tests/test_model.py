import math

import pytest
import torch

from gptdist.model import GPT, GPTConfig, analytic_num_params, flops_per_token, preset


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return GPT(preset("nano", block_size=32)).eval()


def test_output_shapes(nano):
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss, cache = nano(idx, targets=idx)
    assert logits.shape == (3, 17, 50304)
    assert loss.shape == ()
    assert len(cache) == 2 and cache[0][0].shape == (3, 2, 17, 32)


def test_causality(nano):
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    t = 11
    changed[0, t] = (idx[0, t] + 1) % 50257
    a, _, _ = nano(idx)
    b, _, _ = nano(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gpt2_param_count_matches_analytic():
    cfg = preset("gpt2", block_size=512)
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_params()
    assert abs(n - analytic_num_params(cfg)) / analytic_num_params(cfg) < 1e-3
    # 124M with the tied head and block 512 (1024 positions would add 0.4M).
    assert 123.5e6 < n < 124.5e6
    assert flops_per_token(cfg, model.num_params(non_embedding=True)) > 6 * 85e6


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(preset("micro", block_size=64))
    idx = torch.randint(0, 50257, (4, 64))
    targets = torch.randint(0, 50257, (4, 64))  # not idx: the tied head favours the input token
    _, loss, _ = model(idx, targets=targets)
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = GPT(preset("nano", block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    _, loss, _ = model(idx, targets=idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_tying(nano):
    assert nano.lm_head.weight is nano.transformer.wte.weight


def test_invalid_shape_is_rejected():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by model.n_head=3"):
        GPT(GPTConfig(n_layer=1, n_head=3, n_embd=100))
    with pytest.raises(ValueError, match="block_size"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=0))
    with pytest.raises(ValueError, match="vocab_size=1000"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=1000))


def test_generate_extends_sequence(nano):
    idx = torch.zeros((1, 1), dtype=torch.long)
    out = nano.generate(idx, 5, temperature=0.0)
    assert out.shape == (1, 6) and int(out.max()) < 50257
