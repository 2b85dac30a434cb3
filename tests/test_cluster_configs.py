"""The cluster configs are what their tools accept, and the jobs in them can run.

- Launcher YAMLs (cluster/*-gpu.yaml) pass Ray's own validation the way `ray up` runs it
  (its defaults merged, then ``ray/autoscaler/ray-schema.json``), and each node type's
  ``node_config`` is a valid request body of the cloud API it is sent to: EC2 RunInstances
  (botocore's service model) and Compute Engine instances.insert (the discovery document
  that google-api-python-client ships).
- KubeRay manifests validate against the CRD schemas in ../shared/schemas/kuberay with
  unknown fields rejected, as ``kubectl apply`` (strict field validation) does.
- Every ``python ray_jobs/...`` command in the manifests, docs/cluster.md and the local demo
  names a script that exists and whose own argument parser accepts the arguments given;
  ``--config`` files exist and training overrides are keys of the config.
Each validator is also shown to reject a typo, so a pass means something.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

pytest.importorskip("ray")

import ray  # noqa: E402
from conftest import REPO  # noqa: E402

CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
LOCAL_YAML = CLUSTER / "local" / "fake-autoscaling.yaml"
KUBERAY = CLUSTER / "kuberay"
RAY_MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob-train.yaml", KUBERAY / "rayjob-tune.yaml"]
CRDS = Path(os.environ.get("UNIINST_KUBERAY_CRDS", REPO.parent / "shared" / "schemas" / "kuberay"))
DOCS = REPO / "docs" / "cluster.md"
# The image every config runs: Ray's own GPU image for the installed Ray and this Python.
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- cluster launcher


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does with a loaded YAML before it touches a cloud: merge the provider's
    defaults, then validate against Ray's schema (and Ray's extra checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_yaml_passes_ray_up_validation(cloud):
    prepared = ray_up_validate(load(LAUNCHERS[cloud]))
    assert prepared["provider"]["type"] == cloud


def test_local_yaml_passes_the_autoscalers_validation():
    from ray.autoscaler._private.util import validate_config

    # The monitor reads this file as it is (no defaults exist for the fake provider).
    validate_config(load(LOCAL_YAML))


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def apply(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return apply


@pytest.mark.parametrize(
    "mutate",
    [
        _set(("idle_timeout_minute",), 5),  # top-level typo
        _set(("available_node_types", "gpu1_spot", "min_worker"), 0),  # node type typo
        _set(("available_node_types", "gpu1_spot", "resources", "GPU"), 0.5),  # not an integer
        _set(("docker", "imge"), "rayproject/ray:latest"),  # docker typo
        _set(("head_node_type",), "ray.head.default"),  # no such node type
    ],
    ids=["top-level", "node-type", "resource", "docker", "head-type"],
)
def test_ray_validation_rejects_a_broken_launcher_yaml(mutate):
    config = load(LAUNCHERS["aws"])
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(config)


# Ray adds these to a node_config before it calls the cloud, or takes them out.
_RAY_FILLED_AWS = {"MinCount": 1, "MaxCount": 1}


def aws_request_errors(node_config: dict) -> str:
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate({**node_config, **_RAY_FILLED_AWS}, shape)
    return report.generate_report() if report.has_errors() else ""


def test_aws_node_configs_are_valid_run_instances_requests():
    for name, node_type in load(LAUNCHERS["aws"])["available_node_types"].items():
        assert aws_request_errors(node_type["node_config"]) == "", name
    head = load(LAUNCHERS["aws"])["available_node_types"]["head"]["node_config"]
    assert "InstanceTyp" in aws_request_errors({**head, "InstanceTyp": "m5.large"})


@functools.cache
def _compute_schemas() -> dict:
    import googleapiclient

    doc = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "compute.v1.json"
    return json.loads(doc.read_text())["schemas"]


def gce_body_errors(value: Any, schema: dict, path: str = "node_config") -> Iterator[str]:
    """Check a request body against a Google discovery-document schema: unknown fields,
    types and enums (what the API rejects before looking at values)."""
    schemas = _compute_schemas()
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            yield f"{path}: expected an object"
            return
        fields, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            if key in fields:
                yield from gce_body_errors(item, fields[key], f"{path}.{key}")
            elif extra is not None:
                yield from gce_body_errors(item, extra, f"{path}.{key}")
            else:
                yield f"{path}: unknown field {key!r}"
    elif kind == "array":
        if not isinstance(value, list):
            yield f"{path}: expected a list"
            return
        for i, item in enumerate(value):
            yield from gce_body_errors(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        # 64-bit integers are strings in the discovery format; JSON numbers are accepted.
        numeric = schema.get("format") in ("int64", "uint64") and type(value) is int
        if not (isinstance(value, str) or numeric):
            yield f"{path}: expected a string"
        elif "enum" in schema and value not in schema["enum"]:
            yield f"{path}: {value!r} is not one of {schema['enum']}"
    elif kind == "integer" and type(value) is not int:
        yield f"{path}: expected an integer"
    elif kind == "boolean" and type(value) is not bool:
        yield f"{path}: expected a boolean"


def test_gcp_node_configs_are_valid_instance_bodies():
    instance = {"$ref": "Instance"}
    for name, node_type in load(LAUNCHERS["gcp"])["available_node_types"].items():
        assert list(gce_body_errors(node_type["node_config"], instance)) == [], name
    # A misspelt field, and `scheduling` as a list (the form in some of Ray's own examples).
    broken = {"machinType": "g2-standard-8", "scheduling": [{"provisioningModel": "SPOT"}]}
    assert len(list(gce_body_errors(broken, instance))) == 2
    assert list(gce_body_errors({"scheduling": {"provisioningModel": "SPOTT"}}, instance))


def _is_spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def _instance_type(cloud: str, node_config: dict) -> str:
    return node_config["InstanceType" if cloud == "aws" else "machineType"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_scales_gpu_workers_from_zero_on_spot_and_on_demand(cloud):
    config = load(LAUNCHERS[cloud])
    # Ray's current GPU image on every node (no retired rayproject/ray-ml image anywhere).
    assert config["docker"]["image"] == IMAGE
    assert all(value == IMAGE for key, value in config["docker"].items() if key.endswith("image"))
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    for name, node_type in types.items():
        assert node_type["min_workers"] == 0 and 0 < node_type["max_workers"] <= config["max_workers"], name

    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} == {1, 8}
    for gpus in (1, 8):
        group = {name: t for name, t in gpu_types.items() if t["resources"]["GPU"] == gpus}
        spot = [t for t in group.values() if _is_spot(cloud, t["node_config"])]
        on_demand = [t for t in group.values() if not _is_spot(cloud, t["node_config"])]
        assert len(spot) == len(on_demand) == 1, group
        # The same machine, so a job fits either; spot is preferred while it can be had.
        assert spot[0]["resources"] == on_demand[0]["resources"]
        assert _instance_type(cloud, spot[0]["node_config"]) == _instance_type(cloud, on_demand[0]["node_config"])
        assert spot[0]["priority"] > on_demand[0]["priority"]
        # Ray Train's ScalingConfig(accelerator_type=...) asks for this resource.
        assert any(key.startswith("accelerator_type:") for key in spot[0]["resources"])


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_nodes_reach_storage_by_role_and_install_the_project(cloud):
    config = load(LAUNCHERS[cloud])
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        if cloud == "aws":
            assert "Name" in node_config["IamInstanceProfile"] or "Arn" in node_config["IamInstanceProfile"], name
        elif name != config["head_node_type"]:  # Ray gives the GCP head its own account
            scopes = [s for account in node_config["serviceAccounts"] for s in account["scopes"]]
            assert any("devstorage" in s or "cloud-platform" in s for s in scopes), name
    # The checkout `ray up` runs from is synced to every node and installed there.
    (project_dir,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(f'-e "{project_dir}[ray]"' in command for command in config["setup_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    assert any(local == "~/.ray/auth_token" for local in config["file_mounts"].values())


_SECRETS = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", re.I)


def test_no_credentials_in_any_cluster_file():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not _SECRETS.search(path.read_text()), path


def test_dockerfile_builds_on_the_configs_image():
    assert f"FROM {IMAGE}" in (CLUSTER / "Dockerfile").read_text().splitlines()


# --------------------------------------------------------------------------- KubeRay


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD lists an object's fields,
    which is what the API server's strict field validation (kubectl's default) does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    if not CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRDS}")
    group, version = api_version.split("/")
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 40k lines
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD for {kind} in {api_version} under {CRDS}")


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def ray_docs() -> Iterator[tuple[Path, dict]]:
    for path in RAY_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def test_kuberay_manifests_validate_against_the_crds():
    kinds = []
    for path, doc in ray_docs():
        assert doc["apiVersion"] == "ray.io/v1", path
        assert crd_errors(doc) == [], path
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["RayCluster", "RayJob", "RayJob"]


_GPU1_LIMITS = ("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources", "limits")


@pytest.mark.parametrize(
    "manifest, mutate",
    [
        ("raycluster.yaml", _set(("spec", "enableInTreeAutoscalin"), True)),
        ("raycluster.yaml", _set(("spec", "workerGroupSpecs", 1, "minReplica"), 0)),
        ("raycluster.yaml", _set((*_GPU1_LIMITS, "nvidia.com/gpu"), "one")),
        ("rayjob-train.yaml", _set(("spec", "shutdownAfterJobFinish"), True)),
        ("rayjob-tune.yaml", _set(("spec", "rayClusterSpec", "autoscalerOptions", "version"), "v3")),
    ],
    ids=["spec-typo", "group-typo", "gpu-quantity", "rayjob-typo", "enum"],
)
def test_crd_validation_rejects_a_broken_manifest(manifest, mutate):
    doc = load(KUBERAY / manifest)
    mutate(doc)
    assert crd_errors(doc)


def _cluster_specs() -> Iterator[tuple[str, dict]]:
    for path, doc in ray_docs():
        yield path.name, doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pods(spec: dict) -> Iterator[dict]:
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def test_kuberay_clusters_autoscale_gpu_groups_from_zero():
    (account,) = [d for d in yaml.safe_load_all((KUBERAY / "serviceaccount.yaml").read_text())]
    assert account["kind"] == "ServiceAccount"
    for name, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpu_groups = 0
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == 0 == group.get("replicas", 0) and group["maxReplicas"] > 0, name
            resources = group["template"]["spec"]["containers"][0]["resources"]
            if "nvidia.com/gpu" in resources["limits"]:
                gpu_groups += 1
                assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
                assert resources["requests"] == resources["limits"], name  # GPUs cannot be overcommitted
        assert gpu_groups >= 1, name
        for pod in _pods(spec):
            # Storage through the pod's identity (IRSA / Workload Identity), never keys.
            assert pod["serviceAccountName"] == account["metadata"]["name"], name
            assert [c["image"] for c in pod["containers"]] == [IMAGE], name
            env = [e["name"] for c in pod["containers"] for e in c.get("env", [])]
            assert not [e for e in env if e.startswith(("AWS_", "GOOGLE_"))], name


def project_requirements() -> set[str]:
    """The project's runtime dependencies with its `ray` extra, less Ray (the image has it)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["ray"]
    return {str(r) for r in map(Requirement, listed) if r.name != "ray"}


def _runtime_envs() -> Iterator[tuple[str, dict]]:
    yield "runtime-env.yaml", load(KUBERAY / "runtime-env.yaml")
    for path, doc in ray_docs():
        if doc["kind"] == "RayJob":
            yield path.name, yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def test_rayjobs_clean_up_and_install_the_project():
    from packaging.requirements import Requirement
    from ray.runtime_env import RuntimeEnv

    for path, doc in ray_docs():
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True, path
    for name, env in _runtime_envs():
        assert set(env) <= set(RuntimeEnv.known_fields), name
        RuntimeEnv(**env)  # Ray's own checks (e.g. a remote working_dir must be an archive)
        assert {str(Requirement(r)) for r in env["pip"]} == project_requirements(), name
        if name != "runtime-env.yaml":  # a RayJob's code comes from the bucket
            assert re.fullmatch(r"(s3|gs)://.+\.zip", env["working_dir"]), name


# --------------------------------------------------------------------------- entrypoints


def _shell_commands(text: str) -> Iterator[str]:
    """Commands in shell text, backslash continuations joined."""
    yield from re.sub(r"\\\n\s*", " ", text).splitlines()


def job_commands() -> list[tuple[str, list[str]]]:
    """Every `python ray_jobs/...` command: (where it is, argv from `python` on)."""
    found = []
    for path, doc in ray_docs():
        if doc["kind"] == "RayJob":
            found.append((f"{path.name}", shlex.split(doc["spec"]["entrypoint"])))
    comments = [line.lstrip("#") for line in LOCAL_YAML.read_text().splitlines() if line.startswith("#")]
    sources = {
        "docs/cluster.md": "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", DOCS.read_text(), flags=re.S)),
        "cluster/local": "\n".join(comments),  # the demo in the local YAML's header
    }
    for where, text in sources.items():
        for line in _shell_commands(text):
            if "python ray_jobs/" in line:
                argv = shlex.split(line, comments=True)
                found.append((where, argv[argv.index("python"):]))
    return found


@functools.cache
def entrypoint_parser(script: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"_entrypoint_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_every_job_entrypoint_is_checked():
    scripts = {argv[1] for _, argv in job_commands()}
    assert scripts == {"ray_jobs/train.py", "ray_jobs/tune.py", "ray_jobs/prepare_data.py"}
    places = {where for where, _ in job_commands()}
    assert places >= {"rayjob-train.yaml", "rayjob-tune.yaml", "docs/cluster.md", "cluster/local"}


@pytest.mark.parametrize("where, argv", job_commands(), ids=lambda v: v if isinstance(v, str) else Path(v[1]).stem)
def test_job_entrypoint_exists_and_takes_its_arguments(where, argv):
    from uniinst.config import load_config

    script = argv[1]
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    parser = entrypoint_parser(script)
    try:
        args = parser.parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"{where}: {script} rejects {shlex.join(argv[2:])}")
    # Flags spelled in full (argparse would also take a prefix, which a new flag can break).
    flags = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")}
    assert flags <= set(parser._option_string_actions), f"{where}: {flags - set(parser._option_string_actions)}"
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), f"{where}: no {args.config}"
    # The overrides are keys of the config, with values of the right type.
    if script == "ray_jobs/train.py":
        load_config(REPO / args.config, list(args.overrides))
    elif script == "ray_jobs/tune.py":
        from uniinst.search.config import load_search_config

        load_search_config(REPO / args.config, list(args.overrides))


def test_entrypoint_check_rejects_a_wrong_flag_or_config_key():
    from uniinst.config import ConfigError, load_config

    parser = entrypoint_parser("ray_jobs/train.py")
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "configs/uniinst_R50_3x.yaml", "--num-workers", "8"])
    args = parser.parse_args(["--config", "configs/uniinst_R50_3x.yaml", "data.train.shard=s3://my-bucket/x"])
    with pytest.raises(ConfigError):
        load_config(REPO / args.config, list(args.overrides))
