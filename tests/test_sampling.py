"""Cached sampling, `gptdist sample`, and resolving `--from` (folder, Ray
run folder, runs:/<id>, run name)."""

import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from gptdist.checkpoint import CheckpointError, clean_state_dict, model_meta, save_checkpoint
from gptdist.checkpoint_source import resolve_checkpoint, resolve_source
from gptdist.cli import main as cli_main
from gptdist.config import Config
from gptdist.model import GPT, preset
from gptdist.sampling import encode_prompt, generate_cached, sample_text
from gptdist.tokenizer import EOT_TOKEN, decode, encode

BLOCK = 32


def nano_model(seed: int = 0, scale: float = 5.0) -> GPT:
    """Random nano weights. Scaling the attention, MLP and position weights
    makes greedy decoding wander over many tokens instead of repeating one
    (at init the tied head mostly echoes the input token)."""
    torch.manual_seed(seed)
    model = GPT(preset("nano", block_size=BLOCK)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn" in name or "mlp" in name or "wpe" in name:
                p.mul_(scale)
    return model


def write_checkpoint(folder, model: GPT, step: int = 0, **meta):
    return save_checkpoint(
        folder, clean_state_dict(model), None, {"model": model_meta(model.config), "step": step, **meta}
    )


@pytest.fixture(scope="module")
def model():
    return nano_model()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    return torch.randint(0, 50257, (2, 5))


# --- generate_cached == GPT.generate -------------------------------------------


def test_greedy_matches_generate_across_the_block_boundary(model, prompt):
    # 5 + 60 tokens > block_size 32: covers the cached phase and the slid window.
    expected = model.generate(prompt, 60, temperature=0.0)
    got = generate_cached(model, prompt, 60, temperature=0.0)
    assert torch.equal(got, expected)
    assert len(set(got[0, 5:].tolist())) > 10  # a real test, not one repeated token


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 50)])
def test_sampled_matches_generate_with_same_seed(model, prompt, temperature, top_k):
    expected = model.generate(prompt, 45, temperature, top_k, generator=torch.Generator().manual_seed(7))
    got = generate_cached(model, prompt, 45, temperature, top_k, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)


def test_each_new_token_costs_one_position_until_the_window_slides(model, prompt):
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        generate_cached(model, prompt, 30, temperature=0.0)
    finally:
        hook.remove()
    # prefill 5, then one position per token up to 32, then the whole window.
    assert lengths[0] == 5
    assert lengths[1 : BLOCK - 5 + 1] == [1] * (BLOCK - 5)
    assert set(lengths[BLOCK - 5 + 1 :]) == {BLOCK}


def test_on_token_sees_every_new_column(model, prompt):
    seen = []
    out = generate_cached(model, prompt, 8, temperature=0.0, on_token=lambda col: seen.append(col.clone()))
    assert torch.equal(torch.cat(seen, dim=1), out[:, 5:])


# --- sample_text ---------------------------------------------------------------


def test_temperature_zero_is_greedy_whatever_the_seed(model):
    a = sample_text(model, "ROMEO:", max_new_tokens=20, temperature=0.0, seed=1)
    b = sample_text(model, "ROMEO:", max_new_tokens=20, temperature=-1.0, seed=2)
    ids = torch.tensor([encode("ROMEO:")])
    assert a == b == [decode(model.generate(ids, 20, temperature=0.0)[0].tolist())]


def test_seeded_samples_repeat_and_differ_from_each_other(model):
    a = sample_text(model, "Hello", max_new_tokens=15, temperature=1.0, seed=3, num_samples=2)
    b = sample_text(model, "Hello", max_new_tokens=15, temperature=1.0, seed=3, num_samples=2)
    assert a == b and a[0] != a[1] and all(t.startswith("Hello") for t in a)


def test_long_prompt_is_cropped_from_the_left_with_a_message(model, capsys):
    words = " ".join(f"w{i}" for i in range(100))
    ids = encode_prompt(words, BLOCK)
    assert ids == encode(words)[-BLOCK:]
    assert "keeping its last 32 tokens" in capsys.readouterr().err
    [text] = sample_text(model, words, max_new_tokens=5, temperature=0.0)
    assert text.startswith(decode(ids)) and "w0 " not in text


def test_empty_prompt_starts_from_end_of_text():
    assert encode_prompt("", BLOCK) == [EOT_TOKEN]


def test_stream_writes_the_returned_text(model):
    out = io.StringIO()
    [text] = sample_text(model, "The", max_new_tokens=12, temperature=0.9, seed=5, stream=out)
    assert out.getvalue() == text + "\n"


def test_stop_at_eot_ends_the_sample():
    model = nano_model()
    with torch.no_grad():  # every position now prefers <|endoftext|>
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(model.config.n_embd))
        model.lm_head.weight[EOT_TOKEN] = 100 * model.transformer.ln_f.bias
    out = generate_cached(model, torch.tensor([[464]]), 10, temperature=0.0, stop_at_eot=True)
    assert out.tolist() == [[464, EOT_TOKEN]]
    assert sample_text(model, "The", max_new_tokens=10, temperature=0.0, stop_at_eot=True) == ["The"]


# --- gptdist sample and bad checkpoints ---------------------------------------------


def test_cli_sample_streams_from_a_checkpoint_folder(tmp_path, model, capsys):
    folder = write_checkpoint(tmp_path / "ckpt", model, step=3)
    argv = ["sample", "--from", str(folder), "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0"]
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    ids = torch.tensor([encode("Hi")])
    assert out.out == decode(model.generate(ids, 6, temperature=0.0)[0].tolist()) + "\n"
    assert "step 3" in out.err


def test_sample_from_a_folder_imports_neither_ray_nor_mlflow(tmp_path, model):
    """A local checkpoint needs neither, and importing them (MLflow through
    gptdist.tracking) is most of `gptdist sample`'s start-up."""
    folder = write_checkpoint(tmp_path / "ckpt", model)
    code = (
        "import sys\n"
        "from gptdist.cli import main\n"
        f"assert main(['sample', '--from', {str(folder)!r}, '--max-new-tokens', '3']) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "[]"


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, capsys):
    torch.manual_seed(0)
    micro = GPT(preset("micro", block_size=BLOCK))
    nano_meta = model_meta(preset("nano", block_size=BLOCK))
    folder = save_checkpoint(tmp_path / "ckpt", clean_state_dict(micro), None, {"model": nano_meta, "step": 0})
    assert cli_main(["sample", "--from", str(folder), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "another model shape" in err
    assert "n_layer: checkpoint 2 vs model 4" in err and "n_embd: checkpoint 64 vs model 128" in err


def test_tampered_checkpoint_is_refused(tmp_path, model, capsys):
    folder = write_checkpoint(tmp_path / "ckpt", model)
    data = bytearray((folder / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    assert cli_main(["sample", "--from", str(folder), "--max-new-tokens", "2"]) == 1
    assert "sha256" in capsys.readouterr().err


class _Trap:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (self.path.touch, ())


def test_checkpoint_with_a_pickled_object_is_never_unpickled(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, nano_model())
    trap = tmp_path / "trap-fired"
    torch.save({"transformer.wte.weight": _Trap(trap)}, folder / "model.pt")
    meta = json.loads((folder / "meta.json").read_text())  # a consistent sha256: only weights_only protects
    meta["files"]["model.pt"] = __import__("hashlib").sha256((folder / "model.pt").read_bytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    assert cli_main(["sample", "--from", str(folder), "--max-new-tokens", "2"]) == 1
    assert "weights_only" in capsys.readouterr().err
    assert not trap.exists()
    pickle.loads(pickle.dumps(_Trap(trap)))  # the trap is real
    assert trap.exists()


# --- resolving --from ------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local MLflow SQLite store with one experiment, plus a config
    pointing at it and at a Ray storage folder."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{root}/mlflow.db"
    cfg.tracking.runs_dir = str(root / "runs")
    cfg.ray.storage_path = str(root / "ray")
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = client.create_experiment(
        cfg.tracking.experiment, artifact_location=(root / "artifacts").as_uri()
    )
    return cfg, client, experiment_id, root


def log_checkpoint_run(store, name: str, step: int, model_folder=None) -> str:
    cfg, client, experiment_id, root = store
    run = client.create_run(experiment_id, run_name=name)
    if model_folder is not None or step >= 0:
        folder = model_folder or write_checkpoint(root / f"src-{name}-{step}", nano_model(), step=step)
        client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_folder_and_ray_run_folder(tmp_path):
    cfg = Config()
    folder = write_checkpoint(tmp_path / "ckpt", nano_model())
    assert resolve_checkpoint(str(folder), cfg) == folder
    run = tmp_path / "ray-run"
    write_checkpoint(run / "checkpoint_2024-01-01_00-00-02", nano_model(), step=10)
    write_checkpoint(run / "checkpoint_2024-01-01_00-00-01", nano_model(), step=5)
    (run / "checkpoint_2024-01-01_00-00-03").mkdir()  # a write cut short: no meta.json
    assert resolve_checkpoint(str(run), cfg) == run / "checkpoint_2024-01-01_00-00-02"
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "nowhere"), cfg)


def test_runs_uri_downloads_the_model_artifact(store, capsys, monkeypatch):
    cfg = store[0]
    run_id = log_checkpoint_run(store, "uri-run", step=12)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    for source in (f"runs:/{run_id}", f"runs:/{run_id}/model"):
        resolved = resolve_source(source, cfg)
        assert resolved.run_id == run_id
        assert json.loads((resolved.path / "meta.json").read_text())["step"] == 12
    # the second resolution reused the download
    assert resolved.path.is_relative_to(cfg.tracking.runs_dir)
    # no MLflow progress bar in sample's or eval's output, and the setting is not left behind
    assert "Downloading artifacts" not in capsys.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


def test_missing_run_id_names_the_id_and_the_tracking_uri(store, capsys):
    cfg = store[0]
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("runs:/0123456789abcdef", cfg)
    assert "0123456789abcdef" in str(e.value) and cfg.tracking.uri in str(e.value)
    argv = ["sample", "--from", "runs:/0123456789abcdef", "--set", f"tracking.uri={cfg.tracking.uri}"]
    assert cli_main(argv) == 1
    assert "0123456789abcdef" in capsys.readouterr().err


def test_run_without_a_model_artifact_is_a_clear_error(store):
    run_id = log_checkpoint_run(store, "no-model", step=-1)
    with pytest.raises(CheckpointError, match="no artifact folder 'model'"):
        resolve_checkpoint(f"runs:/{run_id}", store[0])


def test_run_name_takes_the_latest_mlflow_run_of_that_name(store):
    cfg = store[0]
    log_checkpoint_run(store, "named", step=1)
    latest = log_checkpoint_run(store, "named", step=2)
    resolved = resolve_source("named", cfg)
    assert resolved.run_id == latest
    assert json.loads((resolved.path / "meta.json").read_text())["step"] == 2


def test_run_name_falls_back_to_ray_storage(store):
    cfg, root = store[0], store[3]
    run_dir = root / "ray" / "ray-only"
    write_checkpoint(run_dir / "checkpoint_a", nano_model(), step=4)
    write_checkpoint(run_dir / "checkpoint_b", nano_model(), step=8)
    assert resolve_checkpoint("ray-only", cfg) == run_dir / "checkpoint_b"
    with pytest.raises(CheckpointError, match="no checkpoint named 'absent'"):
        resolve_checkpoint("absent", cfg)
