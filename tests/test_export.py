"""`gptdist export --format hf`: transformers loads the folder offline and
computes our logits; the tokenizer files round-trip; --out is protected."""

import json
import os

import pytest
import torch

from gptdist.checkpoint import clean_state_dict, model_meta, save_checkpoint
from gptdist.cli import main as cli_main
from gptdist.export import MARKER_FILE, ExportError, export_hf
from gptdist.model import GPT, GPT2_VOCAB_SIZE, preset

transformers = pytest.importorskip("transformers")

# Everything is on disk; a lookup on the Hub would be a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def nano(bias: bool = True, block_size: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("nano", block_size=block_size, bias=bias)).eval()


def hf_logits_match(model: GPT, folder) -> float:
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (3, model.config.block_size))
    with torch.no_grad():
        ours = model(idx)[0][..., :GPT2_VOCAB_SIZE]
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("bias", [True, False])
def test_exported_model_computes_our_logits(tmp_path, bias):
    model = nano(bias)
    export_hf(model, tmp_path / "hf")
    assert hf_logits_match(model, tmp_path / "hf") < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_positions"] == 32 and config["vocab_size"] == GPT2_VOCAB_SIZE


def test_tokenizer_loads_offline_and_encodes_like_gpt2(tmp_path):
    export_hf(nano(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.decode([15496, 995]) == "Hello world"


def test_cli_export_from_a_checkpoint_folder(tmp_path, capsys):
    model = nano()
    folder = save_checkpoint(tmp_path / "ckpt", clean_state_dict(model), None,
                             {"model": model_meta(model.config), "step": 9})
    out = tmp_path / "out"
    assert cli_main(["export", "--from", str(folder), "--out", str(out)]) == 0
    assert "step 9" in capsys.readouterr().out
    assert hf_logits_match(model, out) < 1e-4
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["step"] == 9 and "50257" in marker["vocab_note"]
    # a previous export may be replaced, and nothing is left beside it
    assert cli_main(["export", "--from", str(folder), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_hf(nano(), out)
    folder = save_checkpoint(tmp_path / "ckpt", clean_state_dict(nano()), None,
                             {"model": model_meta(nano().config), "step": 0})
    assert cli_main(["export", "--from", str(folder), "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "precious"]


def test_an_empty_out_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    export_hf(nano(), tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_failed_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    import gptdist.export as export

    def broken(folder, block_size):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_tokenizer_files", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(nano(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
