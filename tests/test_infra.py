"""The cluster configs under infra/ against Ray's cluster-config schema, the sweep CLI, the Dockerfile
and each other. No network and no cluster: files are parsed and checked with what Ray and the
platform themselves accept."""

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
AWS = INFRA / "aws" / "cluster.yaml"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
README = INFRA / "README.md"

# pool (AWS node type = KubeRay worker group) -> the Ray custom resource naming it
POOLS = {"h100": "pool-h100", "h100-spot": "pool-h100-spot"}
SPOT_POOLS = {"h100-spot"}
ACCELERATOR = "accelerator_type:H100"
GPUS_PER_NODE = 8
INSTANCE_TYPE = "p5.48xlarge"
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default --min-worker-port .. --max-worker-port


# ---------------------------------------------------------------------------
# Readers


def _aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(kind: str) -> dict:
    found = [d for _, d in _k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under infra/k8s, found {len(found)}"
    return found[0]


def _docker_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def _docker_args() -> dict[str, str]:
    args = {}
    for line in _docker_lines():
        m = re.match(r"ARG\s+(\w+)(?:=(\S+))?", line)
        if m:
            args[m.group(1)] = m.group(2)
    return args


def _docker_env_names() -> list[str]:
    names = []
    for line in _docker_lines():
        if line.startswith("ENV "):
            names += re.findall(r"(\w+)=", line[4:])
    return names


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert m, "pyproject.toml has no [project] version"
    return m.group(1)


def _readme_torch_pin() -> str:
    pins = set(re.findall(r"torch==([0-9][\w.]*)", (ROOT / "README.md").read_text()))
    assert len(pins) == 1, f"README.md pins torch as {pins}"
    return pins.pop()


def _head_and_workers(cluster: dict) -> tuple[dict, list[dict]]:
    spec = cluster["spec"]
    return spec["headGroupSpec"], spec["workerGroupSpecs"]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _group_resources(group: dict) -> dict:
    """A KubeRay group's Ray resources (the group-level `resources` map, quantities as strings), as numbers.
    They must not also be in rayStartParams: with both, the autoscaler warns and uses the group's."""
    assert "resources" not in group.get("rayStartParams", {}), f"{group.get('groupName')}: resources given twice"
    out = {}
    for name, quantity in group.get("resources", {}).items():
        value = float(str(quantity))
        out[name] = int(value) if value.is_integer() else value
    return out


def _aws_custom(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")}


def _run_option_env(cluster: dict) -> dict[str, str]:
    env = {}
    for opt in cluster["docker"].get("run_options", []):
        m = re.fullmatch(r"(?:--env|-e)[ =](\w+)=(\S+)", opt.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def _code_reads(name: str) -> bool:
    """Whether the project's code names this environment variable."""
    for path in list((ROOT / "lrt_platform").glob("*.py")) + list((ROOT / "lrt_model").glob("*.py")):
        if re.search(rf"""["']{re.escape(name)}["']""", path.read_text()):
            return True
    return False


# ---------------------------------------------------------------------------
# AWS: infra/aws/cluster.yaml


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_cluster_yaml_passes_rays_cluster_config_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema, config = _ray_schema(), _aws()
    jsonschema.validate(config, schema)

    # what `ray up` does before it talks to AWS: merge the provider defaults, then Ray's own validation
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))

    # the schema bites: a fractional pool resource or an unknown key is refused
    broken = copy.deepcopy(config)
    broken["available_node_types"]["h100"]["resources"]["pool-h100"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(config)
    broken["head_start_commands"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_has_a_cpu_head_and_the_two_h100_pools():
    config = _aws()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, \
        "the head runs no trials: CPU 0, no GPU"
    assert not set(head["resources"]) & set(POOLS.values())
    assert set(types) == {config["head_node_type"], *POOLS}

    for pool, resource in POOLS.items():
        node = types[pool]
        r = node["resources"]
        assert node["node_config"]["InstanceType"] == INSTANCE_TYPE
        assert r["GPU"] == GPUS_PER_NODE and r[ACCELERATOR] == 1
        assert r[resource] == GPUS_PER_NODE, f"{pool}: one {resource} unit per GPU"
        assert _aws_custom(r) == {ACCELERATOR: 1, resource: GPUS_PER_NODE}, f"{pool} carries another pool's name"
        assert node.get("min_workers", 0) <= node["max_workers"]
        assert "--gpus all" in node["docker"]["worker_run_options"]
        market = node["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        assert market == ("spot" if pool in SPOT_POOLS else None), f"{pool}: market {market}"
    assert sum(types[p]["max_workers"] for p in POOLS) <= config["max_workers"]


def test_cluster_yaml_keeps_token_auth_and_uses_instance_profiles():
    config, text = _aws(), AWS.read_text()
    assert _run_option_env(config).get("RAY_AUTH_MODE") == "token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert set(re.findall(r"RAY_AUTH_MODE\s*=\s*(\w+)", text)) == {"token"}
    # the token comes from the launching machine at Ray's default path, never from this file
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN" not in text
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through `ray dashboard` only"
    for port in re.findall(r"--[\w-]*port=(\d+)", head_start + " ".join(config["worker_start_ray_commands"])):
        assert int(port) not in RAY_WORKER_PORTS

    assert "aws_credentials" not in config["provider"]
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("IamInstanceProfile"), f"{name} has no IAM instance profile"


def test_cluster_env_is_what_the_code_reads():
    env = _run_option_env(_aws())
    assert re.match(r"https?://", env["MLFLOW_TRACKING_URI"])
    config_map = _one("ConfigMap")["data"]
    assert re.match(r"https?://", config_map["MLFLOW_TRACKING_URI"])
    for name in [*env, *config_map]:
        if not name.startswith("RAY_"):
            assert _code_reads(name), f"{name} is set on the nodes but nothing in lrt_platform/lrt_model reads it"


# ---------------------------------------------------------------------------
# Kubernetes: infra/k8s/*.yaml


def test_k8s_manifests_parse_with_the_expected_kinds():
    docs = _k8s_docs()
    expected = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "ConfigMap": "v1", "ServiceAccount": "v1"}
    kinds = [d["kind"] for _, d in docs]
    for name, doc in docs:
        assert doc["kind"] in expected, f"{name}: unexpected kind {doc['kind']}"
        assert doc["apiVersion"] == expected[doc["kind"]], f"{name}: {doc['kind']} is {doc['apiVersion']}"
        assert doc["metadata"]["name"]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 1
    assert "Secret" not in kinds  # KubeRay makes the token's Secret itself


def test_raycluster_has_token_auth_and_the_two_h100_pools():
    cluster = _one("RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["rayVersion"] == _docker_args()["RAY_VERSION"]
    head, workers = _head_and_workers(cluster)

    containers = [_ray_container(head)] + [_ray_container(g) for g in workers]
    for c in containers:
        for e in c.get("env", []):
            assert e["name"] != "RAY_AUTH_TOKEN" or "value" not in e, "a literal Ray token"
            assert e["name"] != "RAY_AUTH_MODE" or e.get("value") == "token"
        for p in c.get("ports", []):
            assert p["containerPort"] not in RAY_WORKER_PORTS

    assert "nvidia.com/gpu" not in _ray_container(head)["resources"].get("limits", {})
    assert str(head["rayStartParams"]["num-cpus"]) == "0"

    assert {g["groupName"] for g in workers} == set(POOLS)
    for group in workers:
        pool = group["groupName"]
        res = _ray_container(group)["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == GPUS_PER_NODE
        assert int(res["requests"]["nvidia.com/gpu"]) == GPUS_PER_NODE
        assert _group_resources(group) == {POOLS[pool]: GPUS_PER_NODE, ACCELERATOR: 1}
        spec = group["template"]["spec"]
        assert spec["nodeSelector"]["node.kubernetes.io/instance-type"] == INSTANCE_TYPE
        assert spec["nodeSelector"]["eks.amazonaws.com/capacityType"] == ("SPOT" if pool in SPOT_POOLS else "ON_DEMAND")
        tolerated = {t["key"] for t in spec.get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated
        assert ("lrt/spot" in tolerated) == (pool in SPOT_POOLS), f"{pool}: spot toleration"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_pools_agree_between_aws_and_k8s():
    aws = _aws()["available_node_types"]
    _, workers = _head_and_workers(_one("RayCluster"))
    k8s = {g["groupName"]: g for g in workers}
    assert set(k8s) == {t for t in aws if t in POOLS} == set(POOLS)
    for pool in POOLS:
        assert _group_resources(k8s[pool]) == _aws_custom(aws[pool]["resources"])
        assert int(_ray_container(k8s[pool])["resources"]["limits"]["nvidia.com/gpu"]) == aws[pool]["resources"]["GPU"]
        spot_aws = "InstanceMarketOptions" in aws[pool]["node_config"]
        spot_k8s = k8s[pool]["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
        assert spot_aws == spot_k8s == (pool in SPOT_POOLS)
        assert aws[pool]["max_workers"] == k8s[pool]["maxReplicas"]


def test_rayjob_runs_a_sweep_spec_of_this_repository():
    job, cluster = _one("RayJob"), _one("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "lrt_platform.sweep"], argv
    module = importlib.util.find_spec(argv[2])
    assert module and Path(module.origin).resolve().is_relative_to(ROOT), "the module is not this repository's"

    from lrt_platform.execution import check_resources
    from lrt_platform.spec import load_spec
    from lrt_platform.sweep import build_parser

    args = build_parser().parse_args(argv[3:])  # unknown flags exit here
    assert (ROOT / args.spec).is_file(), f"{args.spec} is not in the repository"
    spec = load_spec(str(ROOT / args.spec))
    assert (args.storage or spec.storage).startswith("s3://"), "every node must reach the sweep's storage"
    assert args.resume, "--resume: a resubmitted job continues instead of failing on an existing sweep"

    # the platform's own resource check: one trial fits one node of each pool, as configured
    aws = _aws()["available_node_types"]
    for group in _head_and_workers(cluster)[1]:
        limits = _ray_container(group)["resources"]["limits"]
        k8s_node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        aws_node = {"CPU": float(aws[group["groupName"]]["resources"]["CPU"]),
                    "GPU": float(aws[group["groupName"]]["resources"]["GPU"])}
        for node in (k8s_node, aws_node):
            assert check_resources(spec, node, [{"Resources": node, "Alive": True}]) >= 1


# ---------------------------------------------------------------------------
# One image, one Python, one Ray


def test_every_config_names_the_same_image_and_python():
    version, args = _pyproject_version(), _docker_args()
    python = args["PYTHON_VERSION"]
    image = _aws()["docker"]["image"]
    name, tag = image.rsplit(":", 1)
    assert tag == f"{version}-py{python}", f"{image}: tag should be <pyproject version>-py<PYTHON_VERSION>"
    head, workers = _head_and_workers(_one("RayCluster"))
    for group in [head, *workers]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] == image, f"{c['name']} runs {c['image']}, AWS runs {image}"
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command names another tag"
    assert f'org.opencontainers.image.version="{version}"' in DOCKERFILE.read_text()
    minimum = re.search(r'requires-python\s*=\s*">=\s*([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, python.split("."))) >= tuple(map(int, minimum.split(".")))
    assert f"docker build -f infra/docker/Dockerfile -t {image} ." in README.read_text()


def test_dockerfile_cuda_base_pins_nonroot_and_no_secrets():
    lines, args = _docker_lines(), _docker_args()
    base = [l.split()[1] for l in lines if l.startswith("FROM ")]
    assert len(base) == 1 and re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base[0]), base
    assert args["TORCH_VERSION"] == _readme_torch_pin(), "the image's torch is not the README's pin"
    installs = [l for l in lines if l.startswith("RUN ") and "pip install" in l and "torch==" in l]
    assert len(installs) == 1
    assert '"torch==${TORCH_VERSION}"' in installs[0] and "==${RAY_VERSION}" in installs[0]
    assert re.search(r"pip install [^&]* \.(\s|$)", installs[0]), "the project itself (`.`) is not installed"

    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image runs as root"
    assert f"HOME=/home/{users[-1]}" in " ".join(l for l in lines if l.startswith("ENV "))

    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL", re.I)
    for name in [*args, *_docker_env_names()]:
        assert not secretish.search(name), f"the Dockerfile declares {name}"

    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            sources = [p for p in line.split()[1:-1] if not p.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert f"!{src}" in ignore or f"!{src.rstrip('/')}/" in ignore, f"{src} is outside the build context"


# ---------------------------------------------------------------------------
# No credentials anywhere under infra/

CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                                   # AWS access key ids
    re.compile(r"(?i)\baws_(secret_access_key|access_key_id|session_token)\b\s*[=:]\s*\S"),
    re.compile(r"\bRAY_AUTH_TOKEN\s*[=:]\s*\S"),                                  # a literal Ray token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(password|passwd|api_key|secret_key)\s*[=:]\s*\S"),
]


def _credential_hits(text: str) -> list[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


def test_the_credential_scan_finds_credentials():
    for sample in ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
                   "aws_access_key_id: AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE",
                   "ENV RAY_AUTH_TOKEN=abc123", "-----BEGIN RSA PRIVATE KEY-----", "password: hunter2"):
        assert _credential_hits(sample), sample
    assert not _credential_hits("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/lrt-k8s-token")


def test_no_credentials_in_any_infra_file():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]  # sources, not bytecode
    assert {AWS, DOCKERFILE, README} <= set(files) and len(list(K8S.glob("*.yaml"))) >= 2
    for path in files:
        hits = _credential_hits(path.read_text())
        assert not hits, f"{path.relative_to(ROOT)}: {hits}"


# ---------------------------------------------------------------------------
# infra/README.md


def test_infra_readme_cites_only_files_of_this_repository():
    text = README.read_text()
    assert "/work/" not in text and "shared/" not in text and "../" not in text
    cited = re.findall(r"`((?:infra|sweep_specs|tests|docs|lrt_platform|lrt_model|benchmarks)/[^`\s]*)`", text)
    cited += re.findall(r"\s((?:infra|sweep_specs)/[\w./-]+\.(?:yaml|md))", text)
    assert len(cited) >= 8
    for ref in cited:
        path = ref.split("::")[0]
        assert (ROOT / path).exists(), f"infra/README.md cites {ref}, which is not in the repository"
        if "::" in ref:
            assert re.search(rf"^def {ref.split('::')[1]}\(", (ROOT / path).read_text(), re.M), ref


def test_infra_readme_says_how_to_start_stop_and_submit():
    text = README.read_text()
    for command in ("ray up infra/aws/cluster.yaml", "ray down infra/aws/cluster.yaml",
                    "kubectl apply -f infra/k8s/raycluster.yaml", "kubectl delete -f infra/k8s/raycluster.yaml",
                    "kubectl apply -f infra/k8s/rayjob.yaml", "docker build -f infra/docker/Dockerfile",
                    "ray job submit --address", "RAY_AUTH_MODE=token"):
        assert command in text, f"infra/README.md does not say `{command}`"
    for spec in re.findall(r"lrt_platform\.sweep (sweep_specs/[\w/.-]+\.yaml)", text):
        assert (ROOT / spec).is_file(), spec
    assert "RAY_AUTH_MODE=disabled" not in text


def test_infra_readme_suggests_no_port_in_rays_worker_range():
    ports = [int(p) for p in re.findall(r"--[\w-]*port[ =](\d+)", README.read_text())]
    assert len(ports) >= 8
    bad = sorted(p for p in ports if p in RAY_WORKER_PORTS)
    assert not bad, f"infra/README.md suggests ports Ray keeps for workers: {bad}"
