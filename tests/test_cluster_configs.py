"""The cluster/ configs and scripts, checked without starting anything:
the AWS launcher YAML against Ray's own validator, the KubeRay manifests
for the fields KubeRay requires, the job runtime env against Ray's own
upload filter, the scripts for their defaults, and the process-group
stopper on throwaway processes."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCRIPTS = sorted(CLUSTER.glob("*.sh"))
JOBS = {"prepare_data": "prepare", "train": "train", "tune": "tune", "sample": "sample", "evaluate": "eval"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def import_local_processes():
    spec = importlib.util.spec_from_file_location("local_processes", CLUSTER / "local_processes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- AWS cluster launcher -----------------------------------------------------


def aws_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching AWS: the raw config against
    ray-schema.json, then defaults filled in and validated again."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_rays_validator():
    prepared = ray_validate(aws_config())
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    gpu_types = [t for t in types if t != head]
    assert gpu_types, "no worker node types"
    for name in gpu_types:
        instance = types[name]["node_config"]["InstanceType"]
        assert instance.split(".")[0] in {"g5", "g6", "g6e", "p4d", "p4de", "p5"}, instance
        assert types[name]["min_workers"] == 0, "GPU workers should scale from zero"
        assert types[name]["max_workers"] >= 1
    assert prepared["max_workers"] >= max(types[t]["max_workers"] for t in gpu_types)


def test_aws_validator_rejects_a_broken_config():
    """The check above is live: Ray's schema does reject mistakes."""
    jsonschema = pytest.importorskip("jsonschema")
    broken = aws_config()
    broken["available_node_types"]["head"]["resources"] = {"CPU": "zero"}
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(broken)
    broken = aws_config()
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        ray_validate(broken)


def test_aws_setup_installs_the_project_and_starts_mlflow_on_the_head():
    cfg = aws_config()
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install .*torch==\d+\.\d+.*--index-url https://download\.pytorch\.org/whl/cu\d+", setup)
    assert re.search(r"pip install .*-e ~/gptdist", setup)
    assert "ray[default" in setup and "==" in setup.split("ray[default")[1].split()[0], "pin Ray's version"
    assert cfg["file_mounts"]["~/gptdist"] == "."
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "cluster/start_mlflow.sh" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "MLFLOW_TRACKING_URI" in head_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(cfg["worker_start_ray_commands"])
    # Token auth on every node, with the token shipped to every node.
    assert "RAY_AUTH_MODE=token" in setup
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    # Nothing local and large, nor secrets, is copied up.
    for pattern in (".venv", "data", "runs", "*.pem", ".env"):
        assert pattern in cfg["rsync_exclude"]
    # Shared checkpoint storage is documented.
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "ray.storage_path=s3://" in text and "efs" in text.lower()


# --- KubeRay ------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay's CRD requires, and what gptdist relies on."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    check_pod_template(head["template"], f"{where}.headGroupSpec", gpu=False)
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    for group in groups:
        name = group["groupName"]
        assert isinstance(group["rayStartParams"], dict), f"{where}/{name}: rayStartParams"
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int), f"{where}/{name}: {key}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}/{name}"
        check_pod_template(group["template"], f"{where}/{name}", gpu=True)
    # Token auth (KubeRay >= 1.5.1 with Ray >= 2.52).
    assert spec["authOptions"]["mode"] == "token", f"{where}: authOptions.mode"
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), f"{where}: rayVersion"


def check_pod_template(template: dict, where: str, gpu: bool) -> None:
    pod = template["spec"]
    containers = pod["containers"]
    assert containers, f"{where}: no containers"
    claims = {v["name"] for v in pod.get("volumes", [])}
    for c in containers:
        assert c["name"] and c["image"], f"{where}: container name and image"
        limits = c["resources"]["limits"]
        assert "cpu" in limits and "memory" in limits, f"{where}: cpu/memory limits"
        if gpu:
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: GPU workers need nvidia.com/gpu"
        else:
            assert "nvidia.com/gpu" not in limits, f"{where}: the head needs no GPU"
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in claims, f"{where}: volume {mount['name']} is mounted but not defined"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000", f"{where}: MLFLOW_TRACKING_URI"


def test_kuberay_raycluster():
    docs = load_yaml_docs(KUBERAY / "raycluster.yaml")
    cluster = only(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    check_ray_cluster_spec(cluster["spec"], "RayCluster")
    pvc = only(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts the shared volume"


def rayjob() -> dict:
    return only(load_yaml_docs(KUBERAY / "rayjob.yaml"), "RayJob")


def test_kuberay_rayjob():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    assert "ray.address=auto" in argv
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # One DDP rank per GPU pod.
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert f"ray.num_workers={workers['replicas']}" in argv


def test_kuberay_rayjob_entrypoint_is_a_valid_gptdist_command():
    from gptdist.cli import build_parser
    from gptdist.config import load_config

    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    module = argv[2].removeprefix("jobs.")
    args = build_parser().parse_args([JOBS[module], *argv[3:]])
    cfg = load_config(args.config, args.overrides)
    assert cfg.ray.address == "auto"
    assert cfg.ray.storage_path.startswith("/mnt/shared/")
    assert cfg.data.path.startswith("/mnt/shared/")


def test_kuberay_mlflow():
    docs = load_yaml_docs(KUBERAY / "mlflow.yaml")
    deployment, service, pvc = (only(docs, k) for k in ("Deployment", "Service", "PersistentVolumeClaim"))
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    assert service["metadata"]["name"] == "mlflow", "Ray pods use http://mlflow:5000"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert "--serve-artifacts" in args and "--workers=1" in args
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in container["env"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:*" in allowed, "MLflow answers 403 to a Host it does not know"
    port = service["spec"]["ports"][0]
    assert port["port"] == 5000
    assert port["targetPort"] in {p.get("name") for p in container["ports"]} | {5000}
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


# --- runtime env and jobs -----------------------------------------------------


def test_runtime_env_excludes_data_runs_venv_and_credentials(tmp_path):
    """Zip a fake checkout with Ray's own upload code and see what goes."""
    from ray._private.runtime_env.packaging import _zip_files

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    kept = ["gptdist/model.py", "jobs/train.py", "data_pipeline/prepare.py", "ray_config.yaml", "cluster/submit.sh"]
    dropped = [
        "data/shakespeare/train-00000.parquet", "runs/mlflow.db", "runs/ray/ckpt/model.pt",
        ".venv/bin/python", ".git/config", "gptdist/__pycache__/model.cpython-311.pyc",
        "mlruns/0/meta.yaml", "mlflow.db", "model.pt", ".pytest_cache/v/cache",
        ".env", ".env.local", "deploy.pem", "tls/server.key", "id_rsa", "id_ed25519.pub",
        ".aws/credentials", "gcp-credentials.json", "runs/cluster/auth_token",
        ".pypirc", ".envrc", ".kube/config", ".docker/config.json", "certs/client.p12", "certs/client.pfx",
        "my-project-service-account.json", "keys/gcp_service_account.json", ".config/gcloud/application_default_credentials.json",
    ]
    for rel in kept + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    out = tmp_path.parent / "pkg.zip"
    _zip_files(str(tmp_path), runtime_env["excludes"], str(out), include_gitignore=False)
    names = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert set(kept) <= names
    assert not names & set(dropped), f"uploaded: {sorted(names & set(dropped))}"


@pytest.mark.parametrize("module,command", sorted(JOBS.items()))
def test_job_entrypoints_are_the_cli(module, command):
    source = (REPO / "jobs" / f"{module}.py").read_text()
    assert f'main(["{command}", *sys.argv[1:]])' in source
    out = subprocess.run(
        [sys.executable, "-m", f"jobs.{module}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: gptdist {command} ")


# --- scripts ------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def code_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_scripts_bind_to_loopback_by_default():
    start = (CLUSTER / "start_local.sh").read_text()
    mlflow = (CLUSTER / "start_mlflow.sh").read_text()
    assert "RAY_HOST=${GPTDIST_RAY_HOST:-127.0.0.1}" in start
    assert '--dashboard-host "$RAY_HOST"' in start and '--node-ip-address "$RAY_HOST"' in start
    assert "MLFLOW_HOST=${GPTDIST_MLFLOW_HOST:-127.0.0.1}" in mlflow
    assert '--host "$MLFLOW_HOST"' in mlflow
    assert "AUTH=${GPTDIST_RAY_AUTH:-token}" in start
    for script in SCRIPTS:
        for line in code_lines(script):
            # 0.0.0.0 only ever appears as "connect to 127.0.0.1 instead".
            if "0.0.0.0" in line:
                assert "127.0.0.1" in line or "==" in line, f"{script.name}: {line}"


def test_local_scripts_never_run_ray_stop():
    for script in SCRIPTS:
        for line in code_lines(script):
            assert not re.search(r"\bray\b[\"']?\s+stop\b", line), f"{script.name}: {line}"


def fake_env(tmp_path: Path, state: Path) -> dict:
    """A Python environment whose `ray` prints what it was asked to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    ray = bin_dir / "ray"
    ray.write_text('#!/bin/sh\necho "cwd=$PWD auth=${RAY_AUTH_MODE:-unset} token_path=${RAY_AUTH_TOKEN_PATH:-unset}"\necho "$@"\n')
    ray.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPTDIST_"))}
    env.update(GPTDIST_PYTHON=str(bin_dir / "python"), GPTDIST_CLUSTER_DIR=str(state), HOME=str(tmp_path))
    return env


def test_submit_runs_ray_job_submit_with_the_runtime_env(tmp_path):
    env = fake_env(tmp_path, tmp_path / "state")
    out = subprocess.run(
        [str(CLUSTER / "submit.sh"), "train", "--set", "train.max_steps=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0] == f"cwd={REPO} auth=unset token_path=unset"
    assert out[1] == (
        "job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml "
        "--working-dir . -- python -m jobs.train --set train.max_steps=3"
    )


def test_submit_uses_the_local_clusters_address_and_token(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "auth_token").write_text("t" * 64)
    (state / "env").write_text(
        "export RAY_ADDRESS=http://127.0.0.1:18265\nexport RAY_AUTH_MODE=token\n"
        f"export RAY_AUTH_TOKEN_PATH={state}/auth_token\n"
    )
    env = fake_env(tmp_path, state)
    out = subprocess.run(
        [str(CLUSTER / "submit.sh"), "jobs.evaluate", "--from", "r"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0].endswith(f"auth=token token_path={state}/auth_token")
    assert out[1].startswith("job submit --address http://127.0.0.1:18265 ")
    assert out[1].endswith("-- python -m jobs.evaluate --from r")


def test_submit_turns_token_auth_on_when_a_token_is_at_hand(tmp_path):
    env = fake_env(tmp_path, tmp_path / "state")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 64)
    env["RAY_ADDRESS"] = "http://127.0.0.1:9999"
    out = subprocess.run(
        [str(CLUSTER / "submit.sh"), "train"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "auth=token" in out[0]
    assert out[1].startswith("job submit --address http://127.0.0.1:9999 ")


def test_submit_rejects_an_unknown_job(tmp_path):
    env = fake_env(tmp_path, tmp_path / "state")
    out = subprocess.run([str(CLUSTER / "submit.sh"), "nope"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "jobs/nope.py" in out.stderr


# --- stopping by process group ------------------------------------------------


def test_stop_group_stops_the_group_and_its_descendants_only(tmp_path):
    lp = import_local_processes()
    # A session leader with a child in its group, a grandchild in a group of
    # its own (like a Ray worker) and a child that ignores SIGTERM.
    script = (
        "sleep 300 & "
        "setsid sleep 301 & "
        "(trap '' TERM; sleep 302; sleep 302) & "
        "wait"
    )
    leader = subprocess.Popen(["setsid", "bash", "-c", script])
    bystander = subprocess.Popen(["sleep", "303"])
    try:
        deadline = time.monotonic() + 10
        while len(lp.group_members(leader.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = lp.group_members(leader.pid)
        assert len(members) >= 5, members  # bash, sleep, setsid'd sleep, subshell, its sleep
        assert bystander.pid not in {p.pid for p in members}
        killed = lp.stop_group(leader.pid, grace=1.0)
        assert killed, "the TERM-ignoring subshell needed SIGKILL"
        leader.wait(timeout=5)
        assert not [p for p in members if lp.is_alive(p)]
        assert bystander.poll() is None, "a process outside the group was touched"
    finally:
        bystander.kill()
        for p in lp.group_members(leader.pid):
            os.kill(p.pid, signal.SIGKILL)


def test_stop_leaves_a_group_alone_when_it_is_not_the_recorded_one(tmp_path):
    """A stale state file (PIDs reused since, e.g. after a reboot) must not
    get someone else's processes killed."""
    lp = import_local_processes()
    other = subprocess.Popen(["setsid", "sleep", "304"])
    try:
        deadline = time.monotonic() + 10
        while not lp.group_members(other.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (me,) = lp.group_members(other.pid)
        record = tmp_path / "ray.pids"
        record.write_text(f"{me.pid} {me.start + 1} gcs_server\n")  # same PID, another process
        out = subprocess.run(
            [sys.executable, str(CLUSTER / "local_processes.py"), "stop", str(other.pid), "--recorded", str(record)],
            capture_output=True, text=True, check=True,
        )
        assert "nothing stopped" in out.stderr
        assert other.poll() is None
        record.write_text(f"{me.pid} {me.start} sleep\n")
        subprocess.run(
            [sys.executable, str(CLUSTER / "local_processes.py"), "stop", str(other.pid), "--recorded", str(record)],
            check=True,
        )
        assert other.wait(timeout=10) is not None
    finally:
        other.kill()
