"""`train.attention: auto` on a CPU: the matmul attention computes what
SDPA does, and the faster of the two is measured, cached per machine and
tagged (the real run's tags: tests/test_tracking.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gptdist import attention_probe
from gptdist.attention_probe import (
    AttentionProbe,
    AttentionShape,
    choose_attention,
    measure_attention,
    probe_attention,
)
from gptdist.model import GPT, QUERY_BLOCK, matmul_attention, preset
from gptdist.train_step import resolve_attention

from support import FixedMeasure

SHAPE = AttentionShape(batch=2, heads=2, positions=32, head_dim=16, precision="bf16")


# One query block, and three (two whole, one partial): the later blocks see
# only the keys up to their last query.
@pytest.mark.parametrize("positions", [24, 2 * QUERY_BLOCK + 40])
def test_matmul_attention_computes_what_sdpa_does(positions):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, positions, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, positions, 8, dtype=torch.float64)
    outputs, grads = [], []
    for attend in (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: matmul_attention(q, k, v)):
        out = attend()
        outputs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), grad))
    torch.testing.assert_close(outputs[1], outputs[0])
    for mine, sdpa in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, sdpa)
    # Causal: the first position sees only itself.
    torch.testing.assert_close(outputs[1][:, :, 0], v[:, :, 0])


def test_matmul_attention_with_dropout_drops_and_differentiates():
    """With dropout the blocks go through autograd (the own backward has no
    mask): probabilities are dropped (the output moves from the one without
    dropout) and gradients still reach q, k and v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2 * QUERY_BLOCK, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dropped = matmul_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, matmul_attention(q, k, v))
    for grad in torch.autograd.grad(dropped.sum(), (q, k, v)):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_model_trains_and_samples_the_same_with_either_attention():
    config = preset("nano", block_size=32)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    losses, grads = [], []
    for attention in ("sdpa", "matmul"):
        torch.manual_seed(0)
        model = GPT(config, attention=attention).double()
        _, loss, _ = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
        grads.append(model.lm_head.weight.grad)
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    # Sampling with the KV cache runs through SDPA: one new query at a time.
    out = model.generate(tokens[:1, :4], max_new_tokens=3, top_k=1)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="attention='flash'"):
        GPT(config, attention="flash")


def test_matmuls_in_bf16_only_when_faster_by_the_margin_in_fp32_when_faster():
    assert choose_attention(sdpa_s=0.076, matmul_s=0.039, precision="bf16") == "matmul"  # AVX-512 BF16, no AMX
    assert choose_attention(sdpa_s=0.091, matmul_s=0.222, precision="fp32") == "sdpa"  # fp32 there
    assert choose_attention(sdpa_s=1.0, matmul_s=0.95, precision="bf16") == "sdpa"  # faster, but within the margin
    assert choose_attention(sdpa_s=1.0, matmul_s=0.9, precision="bf16") == "matmul"
    # In fp32 both are exact to fp32 rounding: the faster wins, however narrowly.
    assert choose_attention(sdpa_s=0.0606, matmul_s=0.0577, precision="fp32") == "matmul"
    assert choose_attention(sdpa_s=0.0577, matmul_s=0.0606, precision="fp32") == "sdpa"
    fp32 = probe_attention(AttentionShape(2, 2, 32, 16, "fp32"), None, FixedMeasure(0.0606, 0.0577))
    assert fp32.attention == "matmul" and "the faster is taken" in fp32.summary()
    bf16 = probe_attention(SHAPE, None, FixedMeasure(0.0606, 0.0577))
    assert bf16.attention == "sdpa" and "matmuls need 1.1x" in bf16.summary()


def test_cached_timings_are_reused_per_shape(tmp_path):
    cache = tmp_path / "attention-probe.json"
    measure = FixedMeasure(0.08, 0.04)
    assert probe_attention(SHAPE, cache, measure) == AttentionProbe("matmul", 0.08, 0.04, cached=False, margin=1.1)
    assert probe_attention(SHAPE, cache, measure) == AttentionProbe("matmul", 0.08, 0.04, cached=True, margin=1.1)
    assert measure.calls == 1
    fp32 = AttentionShape(2, 2, 32, 16, "fp32")
    other = probe_attention(fp32, cache, FixedMeasure(0.09, 0.2))
    assert other == AttentionProbe("sdpa", 0.09, 0.2, cached=False, margin=1.0)
    entries = json.loads(cache.read_text()).values()
    assert sorted(e["attention"]["precision"] for e in entries) == ["bf16", "fp32"]


def test_timings_of_another_matmul_path_are_measured_again(tmp_path, monkeypatch):
    cache = tmp_path / "attention-probe.json"
    probe_attention(SHAPE, cache, FixedMeasure(0.08, 0.04))
    monkeypatch.setattr(attention_probe, "QUERY_BLOCK", QUERY_BLOCK * 2)
    again = FixedMeasure(0.05, 0.06)
    assert probe_attention(SHAPE, cache, again) == AttentionProbe("sdpa", 0.05, 0.06, cached=False, margin=1.1)
    assert again.calls == 1


def test_corrupt_cache_is_measured_and_rewritten(tmp_path):
    cache = tmp_path / "attention-probe.json"
    cache.write_text("{not json")
    assert not probe_attention(SHAPE, cache, FixedMeasure(0.08, 0.04)).cached
    assert probe_attention(SHAPE, cache, FixedMeasure(1, 1)).cached


def test_forced_attention_wins_and_gpus_use_sdpa():
    def must_not_run():
        raise AssertionError("the probe ran")

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("matmul", cpu, must_not_run) == ("matmul", None)
    assert resolve_attention("sdpa", cpu, must_not_run) == ("sdpa", None)
    assert resolve_attention("auto", cuda, must_not_run) == ("sdpa", None)
    probed = AttentionProbe("matmul", 0.08, 0.04, cached=True, margin=1.1)
    assert resolve_attention("auto", cpu, lambda: probed) == ("matmul", probed)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_measurement_times_both(precision):
    sdpa_s, matmul_s = measure_attention(AttentionShape(2, 2, 64, 16, precision), seconds=0.2)
    assert 0 < sdpa_s < 1 and 0 < matmul_s < 1
