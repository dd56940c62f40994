import math
import warnings

import pytest
import torch

from gptdist import lm_loss
from gptdist.model import GPT, GPTConfig, analytic_num_params, compile_gpt, flops_per_token, preset


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


def twin_models(chunk_rows_total: int):
    """The same weights twice: one with the plain head + F.cross_entropy, one
    with the chunked head and loss (gptdist.lm_loss)."""
    torch.manual_seed(0)
    plain = GPT(preset("nano", block_size=chunk_rows_total))
    chunked = GPT(preset("nano", block_size=chunk_rows_total), chunked_loss=True)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and groups a few rows long, so that short batches cross their
    boundaries (bf16 matmuls are slow on CPUs without bf16 instructions)."""
    monkeypatch.setattr(lm_loss, "CHUNK_ROWS", 32)
    monkeypatch.setattr(lm_loss, "FP32_CHUNK_ROWS", 64)  # 96-row groups: a chunk of 64, then one of 32
    monkeypatch.setattr(lm_loss, "GROUP_ROWS", 96)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_loss_equals_plain_loss_and_gradients(precision, small_chunks):
    # 3 x 70 = 210 rows: more than one group of GROUP_ROWS and a ragged
    # last chunk, so the chunk and group boundaries are exercised.
    assert 210 > 2 * lm_loss.GROUP_ROWS and 210 % lm_loss.CHUNK_ROWS and 210 % lm_loss.FP32_CHUNK_ROWS
    plain, chunked = twin_models(70)
    idx = torch.randint(0, 50257, (3, 70))
    targets = torch.randint(0, 50257, (3, 70))
    results = []
    for model in (plain, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits, loss, _ = model(idx, targets=targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (plain_logits, plain_loss, plain_grads), (chunked_logits, chunked_loss, chunked_grads) = results
    assert plain_logits is not None and chunked_logits is None
    loss_tol, grad_tol = (1e-5, 1e-5) if precision == "fp32" else (2e-3, 2e-2)
    assert abs(plain_loss.item() - chunked_loss.item()) < loss_tol
    for name, g in plain_grads.items():
        scale = g.abs().max().item()
        assert (g - chunked_grads[name]).abs().max().item() <= grad_tol * scale + 1e-9, name


def test_chunked_loss_without_grad_equals_plain_loss():
    plain, chunked = twin_models(300)
    idx = torch.randint(0, 50257, (2, 300))
    with torch.no_grad():
        _, plain_loss, _ = plain(idx, targets=idx)
        _, chunked_loss, _ = chunked(idx, targets=idx)
    assert abs(plain_loss.item() - chunked_loss.item()) < 1e-5


def test_chunked_loss_reuses_its_workspace_across_calls_and_shapes(small_chunks):
    """The scratch buffers persist between steps; a new batch shape or dtype
    gets new ones, and every call still matches the plain loss."""
    plain, chunked = twin_models(70)
    kept = []
    for rows, bf16 in [(70, True), (70, True), (20, True), (70, False)]:
        idx = torch.randint(0, 50257, (3, rows))
        results = []
        for model in (plain, chunked):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss, _ = model(idx, targets=idx)
            loss.backward()
            results.append((loss.item(), model.transformer.wte.weight.grad))
        (plain_loss, plain_grad), (chunked_loss, chunked_grad) = results
        assert abs(plain_loss - chunked_loss) < (2e-3 if bf16 else 1e-5)
        assert (plain_grad - chunked_grad).abs().max() <= (2e-2 if bf16 else 1e-5) * plain_grad.abs().max()
        kept.append(chunked.loss_workspace._buffers)
    assert kept[0] is kept[1] and kept[2] is not kept[1] and kept[3] is not kept[2]


def test_chunked_loss_gradient_follows_a_scaled_loss():
    """Gradient accumulation backpropagates loss / steps: the chunked head's
    gradients must scale with it (backward skips the product only for 1)."""
    plain, chunked = twin_models(300)
    idx = torch.randint(0, 50257, (2, 300))
    for model in (plain, chunked):
        _, loss, _ = model(idx, targets=idx)
        (loss * 0.25).backward()
    for (name, p), c in zip(plain.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, c.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_of_a_target_far_below_the_rest_is_exact(dtype):
    """The loss comes from the target's softmax probability; where that
    underflows (here e^-300) the row's loss is recomputed, not inf or a cap."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 8) * 0.1
    weight = torch.randn(64, 8) * 0.1
    targets = torch.tensor([3, 5, 7, 9, 11, 13])
    hidden[0] = 0.0
    hidden[0, 0] = 10.0
    weight[3, 0] = -30.0  # row 0's target logit: -300, the others near 0
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    loss = lm_loss.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy((ref_hidden @ ref_weight.t()).float(), targets)
    reference.backward()
    assert torch.isfinite(loss) and reference.item() > 300 / 6
    assert abs(loss.item() - reference.item()) < 1e-4 * reference.item()
    assert torch.allclose(hidden.grad.float(), ref_hidden.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.allclose(weight.grad.float(), ref_weight.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_compiled_model_leaves_the_chunked_loss_eager_and_matches(attention):
    """compile_gpt: torch.compile traces the model but not the chunked loss
    (a graph break there), and loss and gradients equal the eager model's,
    with either attention, and without Dynamo's warning about tracing
    through a cached function. Dynamo's eager backend keeps the test quick;
    inductor traces the same graphs."""
    import torch._dynamo

    torch.manual_seed(0)
    config = preset("nano", block_size=256)  # two query blocks of the matmul attention
    eager = GPT(config, chunked_loss=True, attention=attention)
    compiled = GPT(config, chunked_loss=True, attention=attention)
    compiled.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 50257, (2, 256))
    wrapped = compile_gpt(compiled, backend="eager")
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        breaks = torch._dynamo.explain(compiled)(idx, targets=idx).break_reasons
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    assert breaks and all("disable" in str(b.reason) for b in breaks), breaks
    assert not [f for b in breaks for f in b.user_stack if f.filename == lm_loss.__file__], breaks
    losses = []
    for model in (eager, wrapped):
        _, loss, _ = model(idx, targets=idx)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
