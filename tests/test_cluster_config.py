"""The Ray cluster launcher config is one `ray up` accepts, ships this checkout, installs it from the
lock and fails loudly when the install fails, gives every node the tracking server, and, bootstrapped
by Ray's own `ray up` code on moto's EC2 and IAM, gives the head what the autoscaler needs to start
the workers and the workers what they need for the bucket."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.fixtures_data import REPO

CONFIG = REPO / "configs/aws-gpu-cluster.yaml"


def test_launcher_config_is_valid_for_ray_up():
    import jsonschema
    import ray

    schema = json.loads(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler/ray-schema.json")).read())
    jsonschema.validate(yaml.safe_load(CONFIG.read_text()), schema)


def test_launcher_installs_the_locked_project_and_fails_loudly():
    cfg = yaml.safe_load(CONFIG.read_text())
    mounts = cfg["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    setup = cfg["setup_commands"]
    assert not any("|| true" in c or "; true" in c for c in setup), setup
    assert any(f"-c {project}/constraints.txt" in c and f"-e {project}" in c for c in setup), setup
    assert (REPO / "constraints.txt").is_file()  # what the mount ships
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "MLFLOW_TRACKING_URI=http" in start and "dit-venv/bin/ray start" in start, start


# ---------------------------------------------------------------------------------------------
# The roles the config names, made as docs/cluster.md says, bootstrapped by Ray's own `ray up` code
# on moto's in-process EC2 and IAM. moto does not implement SimulatePrincipalPolicy, so "may" is
# moto's own IAM policy evaluator (the one behind its access control) over every policy attached to
# the role, inline or managed: allowed by a statement, denied by none.
# ---------------------------------------------------------------------------------------------

BUCKET = "dit-launch-test"
REGION = "us-east-1"
# What the autoscaler on the head calls to keep the workers running (ray/autoscaler/_private/aws/node_provider.py).
AUTOSCALER_EC2 = ("RunInstances", "DescribeInstances", "DescribeInstanceTypes", "CreateTags", "TerminateInstances")
S3_OBJECT = ("GetObject", "PutObject", "DeleteObject")


def _setup_script() -> str:
    """The IAM setup block of docs/cluster.md, as a user runs it."""
    doc = (REPO / "docs/cluster.md").read_text()
    block = next(b for b in doc.split("```bash\n")[1:] if b.startswith("# dit-ray IAM setup"))
    return block.split("```")[0]


def _aws_cli(argv: list[str]) -> None:
    """Run one recorded `aws SERVICE OPERATION --param value ...` through boto3 (the CLI is not installed
    here): operation and parameter names resolved through botocore's service model, as the CLI does."""
    import boto3
    from botocore import xform_name

    service, operation, *rest = argv
    client = boto3.client(service, region_name=REGION)
    model = client.meta.service_model
    op = next(o for o in model.operation_names if xform_name(o, "-") == operation)
    members = model.operation_model(op).input_shape.members
    params = {}
    for flag, value in zip(rest[::2], rest[1::2]):
        if flag in ("--query", "--output"):
            continue
        name = next((m for m in members if f"--{xform_name(m, '-')}" == flag), None)
        assert name, f"`aws {service} {operation}` has no {flag} (docs/cluster.md)"
        params[name] = (REPO / value[len("file://"):]).read_text() if value.startswith("file://") else value
    getattr(client, xform_name(op))(**params)


def _run_setup_as_documented(tmp_path, account: str) -> list[list[str]]:
    """The docs' block in bash, with `aws` a function that records each call (and answers the account id
    for `aws sts get-caller-identity`); each recorded call then runs on moto. Returns the calls."""
    import subprocess

    calls = tmp_path / "aws-calls"
    script = ("aws() { if [ \"$1 $2\" = 'sts get-caller-identity' ]; then echo \"$ACCOUNT_ID\"; return; fi\n"
              "        printf '%s\\037' \"$@\" >> \"$CALLS\"; printf '\\036' >> \"$CALLS\"; }\n"
              "set -euo pipefail\n" + _setup_script().replace("BUCKET=<bucket>", f"BUCKET={BUCKET}"))
    env = {"PATH": os.environ["PATH"], "CALLS": str(calls), "ACCOUNT_ID": account, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recorded = [c.split("\x1f")[:-1] for c in calls.read_text().split("\x1e") if c]
    for argv in recorded:
        _aws_cli(argv)
    return recorded


def _filled_config(image_id: str) -> dict:
    """The config as a user fills it in: its <...> replaced (in a copy)."""
    text = CONFIG.read_text().replace("<ami-id>", image_id).replace("<mlflow-host>", "mlflow.internal")
    assert "<" not in "".join(line.split("#")[0] for line in text.splitlines()), "a <...> placeholder left unfilled"
    return yaml.safe_load(text)


def _role_of(profile: dict) -> dict:
    import boto3

    iam = boto3.client("iam", region_name=REGION)
    name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[-1]
    roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
    assert len(roles) == 1, f"instance profile {name} holds {len(roles)} roles"
    return roles[0]


def _may(role: dict, action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether the role's policies allow ``action`` on ``resource`` (wildcards as IAM reads them)."""
    import boto3
    from moto.iam.access_control import IAMPolicy, PermissionResult

    iam = boto3.client("iam", region_name=REGION)
    name = role["RoleName"]
    documents = [json.dumps(iam.get_role_policy(RoleName=name, PolicyName=p)["PolicyDocument"])
                 for p in iam.list_role_policies(RoleName=name)["PolicyNames"]]
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        document = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
        documents.append(document if isinstance(document, str) else json.dumps(document))
    results = [IAMPolicy(d).is_action_permitted(action, resource, incoming_condition_values=context) for d in documents]
    return PermissionResult.PERMITTED in results and PermissionResult.DENIED not in results


@pytest.fixture()
def aws(request, monkeypatch, tmp_path):
    """moto's in-process AWS (EC2, IAM, STS), with an AMI of the kind the config asks for; HOME in
    tmp_path, where Ray's bootstrap writes the key pair it makes. The session's S3 server stays out.
    Parametrized True (indirect): with AWS's managed policies, which Ray's default role attaches (slow)."""
    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true" if getattr(request, "param", False) else "false")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)   # IAM propagation waits: moto needs none
    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        image = ec2.register_image(Name="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)",
                                   RootDeviceName="/dev/sda1", Architecture="x86_64")["ImageId"]
        account = boto3.client("sts", region_name=REGION).get_caller_identity()["Account"]
        yield {"image": image, "account": account}
    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()


def _bootstrap(config: dict) -> dict:
    """What `ray up` does to the config before it starts the head: Ray's own code, unchanged."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(config, no_config_cache=True)


def test_bootstrapped_head_can_launch_the_workers_and_the_workers_reach_the_bucket(aws, tmp_path):
    import boto3

    calls = _run_setup_as_documented(tmp_path, aws["account"])
    assert any(c[:2] == ["iam", "add-role-to-instance-profile"] for c in calls), calls
    resolved = _bootstrap(_filled_config(aws["image"]))

    nodes = resolved["available_node_types"]
    head_cfg = nodes[resolved["head_node_type"]]["node_config"]
    worker_types = [t for t in nodes if t != resolved["head_node_type"]]
    assert worker_types and all(nodes[t]["node_config"]["ImageId"] == aws["image"] for t in nodes)
    # Ray took the head's profile as given: it made no role of its own, and set none beside it
    assert resolved["head_node"] == {}
    iam = boto3.client("iam", region_name=REGION)
    assert "ray-autoscaler-v1" not in [r["RoleName"] for r in iam.list_roles()["Roles"]]
    # ... and resolved the rest `ray up` needs: a subnet, a security group, a key pair
    for t in nodes:
        assert nodes[t]["node_config"]["SubnetIds"] and nodes[t]["node_config"]["SecurityGroupIds"]
        assert nodes[t]["node_config"]["KeyName"]
    assert os.path.isfile(resolved["auth"]["ssh_private_key"])

    head = _role_of(head_cfg["IamInstanceProfile"])
    for action in AUTOSCALER_EC2:
        assert _may(head, f"ec2:{action}", "*"), f"the head's role {head['RoleName']} may not ec2:{action}"
    bucket, objects = f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/dit/data/latents/part-0.parquet"
    for t in worker_types:
        worker = _role_of(nodes[t]["node_config"]["IamInstanceProfile"])
        # the head passes the workers' role to EC2 when it runs them with their profile
        assert _may(head, "iam:PassRole", worker["Arn"], {"iam:PassedToService": "ec2.amazonaws.com"}), worker["Arn"]
        # the workers (and the job drivers on the head) reach the bucket
        for role in (worker, head):
            assert _may(role, "s3:ListBucket", bucket), role["RoleName"]
            for action in S3_OBJECT:
                assert _may(role, f"s3:{action}", objects), (role["RoleName"], action)
        # and no more: not another bucket, not EC2, not a role of their own to pass
        assert not _may(worker, "s3:GetObject", "arn:aws:s3:::another-bucket/x")
        assert not _may(worker, "ec2:RunInstances", "*")
        assert not _may(worker, "iam:PassRole", worker["Arn"], {"iam:PassedToService": "ec2.amazonaws.com"})
        trust = worker["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        assert any(s["Effect"] == "Allow" and s["Principal"].get("Service") == "ec2.amazonaws.com"
                   and s["Action"] == "sts:AssumeRole" for s in trust["Statement"])
    # the head passes no other role (e.g. an administrator's)
    assert not _may(head, "iam:PassRole", f"arn:aws:iam::{aws['account']}:role/admin",
                    {"iam:PassedToService": "ec2.amazonaws.com"})
    # the config before issue 25 gave the head dit-ray-s3 (the bucket only): no autoscaling from there
    assert not _may(_role_of({"Name": "dit-ray-s3"}), "ec2:RunInstances", "*")


@pytest.mark.parametrize("aws", [True], indirect=True, ids=["with-aws-managed-policies"])
def test_rays_default_head_role_could_not_pass_the_workers_profile(aws, tmp_path):
    """Why the config names the head's profile: without one, Ray's bootstrap makes ray-autoscaler-v1
    (EC2 and S3 full access), which may run instances but not pass the workers' role dit-ray-s3."""
    _run_setup_as_documented(tmp_path, aws["account"])
    config = _filled_config(aws["image"])
    head_type = config["head_node_type"]
    del config["available_node_types"][head_type]["node_config"]["IamInstanceProfile"]
    resolved = _bootstrap(config)

    default = _role_of(resolved["head_node"]["IamInstanceProfile"])
    assert default["RoleName"] == "ray-autoscaler-v1"
    assert _may(default, "ec2:RunInstances", "*")
    worker = _role_of(config["available_node_types"]["gpu_8x"]["node_config"]["IamInstanceProfile"])
    assert not _may(default, "iam:PassRole", worker["Arn"], {"iam:PassedToService": "ec2.amazonaws.com"})

