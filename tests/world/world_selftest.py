#!/usr/bin/env python3
"""Self-test of the test world's knobs (tests/world/world.py).

    PY=$(tests/world/setup.sh | tail -n1); "$PY" tests/world/world_selftest.py

Starts one world (`world.py serve`), checks with boto3 (retries off) and urllib every
knob that makes the world less kind than moto alone: the fault layer (throttle and error
shapes per protocol, lose, slow, lag, times/after, token buckets, stats), IMDS `down`,
`/node/replace`, and the ECS agent fixture's checkpoint (`--ecs-data`), stop/start and
`/v1/tasks`; then a second world of three nodes (`--nodes`, `?node=K`, `GET /ecs/tasks`). One
line per check; exit 1 if any fails. Each world is stopped by its PID, whatever happens. Takes
about 20 s.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

HERE = Path(__file__).resolve().parent
CLUSTER, ASG, IP_OVERRIDE = "selftest", "selftest-asg", "10.9.8.7"
TASKDEF = {"family": "selftest", "containerDefinitions": [
    {"name": "app", "image": "busybox", "memory": 32, "essential": True},
    {"name": "sidecar", "image": "busybox", "memory": 32, "essential": False}]}

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'}  {name}" + (f"  [{detail}]" if detail and not ok else ""), flush=True)
    if not ok:
        failures.append(name)
    return ok


def http(method, url, body=None, headers=None, timeout=5):
    """(status, headers, body bytes); raises OSError (URLError) when the connection fails."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def refused(url):
    """True if a TCP connection to the URL's port is refused."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


class World:
    def __init__(self, root, args):
        self.log = open(root / "world.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "world.py"), "serve", *args],
                                     stdout=subprocess.PIPE, stderr=self.log)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise SystemExit(f"world did not start; see {root / 'world.log'}")
        self.info = json.loads(line)

    def __getitem__(self, key):
        return self.info[key]

    def control(self, method, path, body=None):
        status, _, out = http(method, self["control_url"] + path, body if body is not None else {})
        return status, json.loads(out or b"null")

    def client(self, service):
        return boto3.client(service, region_name=self["region"], endpoint_url=self["moto_url"],
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(retries={"total_max_attempts": 1}))

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def error_of(call):
    """(error code, HTTP status, headers) of a ClientError, or (None, None, None) if the call worked."""
    try:
        call()
    except ClientError as e:
        meta = e.response.get("ResponseMetadata", {})
        return e.response["Error"]["Code"], meta.get("HTTPStatusCode"), meta.get("HTTPHeaders", {})
    return None, None, None


def imds_get(world, path, token=None):
    if token is None:
        _, _, token = http("PUT", world["imds_url"] + "/latest/api/token",
                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        token = token.decode()
    status, _, out = http("GET", world["imds_url"] + path, headers={"X-aws-ec2-metadata-token": token})
    return status, out.decode()


def agent_arn(world, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, out = http("GET", world["agent_url"] + "/v1/metadata", timeout=1)
            if status == 200:
                return json.loads(out)["ContainerInstanceArn"]
        except OSError:
            pass
        time.sleep(0.05)
    return None


def checkpoint(data_dir):
    try:
        return json.loads((data_dir / "ecs_agent_data.json").read_text())
    except (OSError, ValueError):
        return None


def run(world, data_dir):
    ecs, ec2, asg = world.client("ecs"), world.client("ec2"), world.client("autoscaling")
    arn = agent_arn(world)
    check("agent comes up and registers a container instance", arn is not None)
    ecs.register_task_definition(**TASKDEF)
    world.control("POST", "/stats/reset")

    def start(started_by):
        return ecs.start_task(cluster=CLUSTER, taskDefinition="selftest", containerInstances=[arn],
                              startedBy=started_by)["tasks"][0]["taskArn"]

    def listed(started_by):
        return ecs.list_tasks(cluster=CLUSTER, startedBy=started_by)["taskArns"]

    # -- throttle: the service's own shape, not passed to moto
    status, body = world.control("POST", "/faults", {"rules": [
        {"op": "ecs:ListClusters", "fault": "throttle", "times": 1},
        {"op": "ec2:DescribeInstances", "fault": "throttle", "times": 1},
        {"op": "autoscaling:DescribeAutoScalingGroups", "fault": "throttle", "times": 1},
        {"op": "ec2:CreateTags", "fault": "throttle", "times": 1}]})
    check("POST /faults takes rules", status == 200 and len(body["rules"]) == 4, f"{status} {body}")
    code, http_status, headers = error_of(ecs.list_clusters)
    check("ECS throttle: ThrottlingException, 400, x-amzn-ErrorType",
          (code, http_status, headers.get("x-amzn-errortype")) == ("ThrottlingException", 400, "ThrottlingException"),
          f"{code} {http_status} {headers}")
    code, http_status, _ = error_of(ec2.describe_instances)
    check("EC2 throttle: RequestLimitExceeded, 503", (code, http_status) == ("RequestLimitExceeded", 503),
          f"{code} {http_status}")
    code, http_status, _ = error_of(asg.describe_auto_scaling_groups)
    check("Auto Scaling throttle: Throttling, 400", (code, http_status) == ("Throttling", 400), f"{code} {http_status}")
    node = world["instance_id"]
    code, _, _ = error_of(lambda: ec2.create_tags(Resources=[node], Tags=[{"Key": "selftest", "Value": "x"}]))
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [node]}, {"Name": "key", "Values": ["selftest"]}])
    check("a throttled call never reaches moto", code == "RequestLimitExceeded" and not tags["Tags"], f"{code} {tags['Tags']}")
    check("times=1: the next call goes through", error_of(ecs.list_clusters)[0] is None)

    # -- error: the service's server error shape
    world.control("POST", "/faults", {"rules": [
        {"op": "ecs:ListClusters", "fault": "error"}, {"op": "ec2:DescribeInstances", "fault": "error"},
        {"op": "autoscaling:DescribeAutoScalingGroups", "fault": "error"}]})
    got = [error_of(ecs.list_clusters)[:2], error_of(ec2.describe_instances)[:2],
           error_of(asg.describe_auto_scaling_groups)[:2]]
    check("error: ServerException / InternalError / InternalFailure, 500",
          got == [("ServerException", 500), ("InternalError", 500), ("InternalFailure", 500)], str(got))

    # -- times / after
    world.control("POST", "/faults", {"rules": [{"op": "ecs:ListClusters", "fault": "error", "after": 2, "times": 2}]})
    outcomes = [error_of(ecs.list_clusters)[0] for _ in range(5)]
    _, body = world.control("GET", "/faults")
    rule = body["rules"][0]
    check("after=2 times=2: ok ok error error ok; seen 5, fired 2",
          outcomes == [None, None, "ServerException", "ServerException", None] and (rule["seen"], rule["fired"]) == (5, 2),
          f"{outcomes} {rule}")

    # -- slow
    world.control("POST", "/faults", {"rules": [{"op": "ecs:ListClusters", "fault": "slow", "delay_ms": 400, "times": 1}]})
    t0 = time.monotonic()
    slow_ok = error_of(ecs.list_clusters)[0] is None
    slow = time.monotonic() - t0
    t0 = time.monotonic()
    ecs.list_clusters()
    fast = time.monotonic() - t0
    check("slow: delay_ms=400 answers after >= 0.4 s, then fast again", slow_ok and slow >= 0.4 and fast < 0.3,
          f"{slow:.3f} s, {fast:.3f} s")

    # -- lose: moto does it, the client gets no answer
    world.control("POST", "/faults", {"rules": [{"op": "ecs:StartTask", "fault": "lose", "times": 1}]})
    try:
        start("selftest-lose")
        lost = None
    except (BotoConnectionError, HTTPClientError) as e:  # connection closed / reset before an answer
        lost = e
    check("lose: the client gets a connection error", lost is not None, "the call was answered")
    check("lose: the task exists in moto all the same", len(listed("selftest-lose")) == 1, str(listed("selftest-lose")))

    # -- lag: eventual consistency of ListTasks / DescribeTasks after StartTask
    world.control("POST", "/faults", {"rules": [{"op": "*", "fault": "lag", "lag_ms": 1500}]})
    started_at = time.monotonic()
    task = start("selftest-lag")
    early_list = listed("selftest-lag")
    early = ecs.describe_tasks(cluster=CLUSTER, tasks=[task])
    status, _, out = http("GET", world["agent_url"] + "/v1/tasks")
    local = [t["Arn"] for t in json.loads(out)["Tasks"]] if status == 200 else []
    check("lag: ListTasks leaves a new task out", early_list == [], str(early_list))
    check("lag: DescribeTasks answers it MISSING",
          early["tasks"] == [] and early["failures"] == [{"arn": task, "reason": "MISSING"}], str(early["failures"]))
    check("lag: the local agent's /v1/tasks knows it at once", task in local, str(local))
    time.sleep(max(0.0, 1.6 - (time.monotonic() - started_at)))
    late = ecs.describe_tasks(cluster=CLUSTER, tasks=[task])
    check("lag: after lag_ms ListTasks and DescribeTasks show it",
          listed("selftest-lag") == [task] and [t["taskArn"] for t in late["tasks"]] == [task] and not late["failures"])
    world.control("POST", "/faults", {"rules": []})
    check("POST /faults {rules: []} clears", world.control("GET", "/faults")[1] == {"rules": []})
    status, body = world.control("POST", "/faults", {"rules": [{"op": "*", "fault": "melt"}]})
    check("an unknown fault is refused (400)", status == 400, f"{status} {body}")

    # -- token bucket: burst 3, rate 1/s
    world.control("POST", "/buckets", {"groups": [{"name": "t", "ops": ["ecs:ListClusters"], "burst": 3, "rate": 1}]})
    burst = [error_of(ecs.list_clusters)[0] for _ in range(4)]
    time.sleep(1.05)
    refill = [error_of(ecs.list_clusters)[0] for _ in range(2)]
    _, buckets = world.control("GET", "/buckets")
    check("bucket burst 3: the 4th immediate call is throttled",
          burst == [None, None, None, "ThrottlingException"], str(burst))
    check("bucket rate 1/s: one call through a second later, the next throttled",
          refill == [None, "ThrottlingException"] and buckets["groups"][0]["throttled"] == 2, f"{refill} {buckets}")
    world.control("POST", "/buckets", {"groups": []})
    check("POST /buckets {groups: []} clears", error_of(ecs.list_clusters)[0] is None)

    # -- stats
    _, stats = world.control("GET", "/stats")
    aws = stats["aws"]
    faults = aws["faults_by_operation"]
    lost_entries = [e for e in aws["sequence"] if e.get("fault") == "lose"]
    check("stats: throttled and throttled_by_operation",
          aws["throttled"] == 6 and aws["throttled_by_operation"] == {
              "ecs:ListClusters": 3, "ec2:DescribeInstances": 1, "autoscaling:DescribeAutoScalingGroups": 1,
              "ec2:CreateTags": 1}, f"{aws['throttled']} {aws['throttled_by_operation']}")
    check("stats: faults_by_operation",
          faults.get("ecs:StartTask") == {"lose": 1} and faults.get("ecs:ListTasks") == {"lag": 1}
          and faults.get("ecs:DescribeTasks") == {"lag": 1} and faults.get("ecs:ListClusters", {}).get("slow") == 1
          and faults.get("ecs:ListClusters", {}).get("error") == 3, json.dumps(faults))
    check("stats: sequence marks the faulted calls; by_operation counts every call",
          len(lost_entries) == 1 and lost_entries[0]["op"] == "ecs:StartTask"
          and aws["by_operation"].get("ecs:StartTask") == 2 and aws["by_operation"].get("ec2:CreateTags") == 1,
          f"{lost_entries} {aws['by_operation']}")
    total = aws["total"]
    http("GET", world["agent_url"] + "/v1/tasks")
    check("stats: the agent fixture's own moto calls are not counted", world.control("GET", "/stats")[1]["aws"]["total"] == total)
    world.control("POST", "/stats/reset")
    aws = world.control("GET", "/stats")[1]["aws"]
    check("POST /stats/reset resets the fault counters",
          (aws["throttled"], aws["throttled_by_operation"], aws["faults_by_operation"]) == (0, {}, {}))

    # -- IMDS down / ok
    world.control("POST", "/imds", {"mode": "down"})
    was_refused = refused(world["imds_url"])
    world.control("POST", "/imds", {"mode": "ok"})
    status, instance = imds_get(world, "/latest/meta-data/instance-id")
    check("IMDS down: connection refused; ok: served again on the same port",
          was_refused and status == 200 and instance == node, f"{was_refused} {status} {instance}")

    # -- /v1/tasks
    status, headers, out = http("GET", world["agent_url"] + "/v1/tasks")
    tasks = {t["Arn"]: t for t in json.loads(out)["Tasks"]}
    one = tasks.get(task, {})
    check("/v1/tasks: the task started with StartTask, in the introspection format",
          status == 200 and one.get("DesiredStatus") == "RUNNING" and one.get("KnownStatus") == "RUNNING"
          and (one.get("Family"), one.get("Version")) == ("selftest", "1")
          and [c["Name"] for c in one.get("Containers", [])] == ["app", "sidecar"]
          and all(re.fullmatch(r"[0-9a-f]{64}", c["DockerId"]) and c["DockerName"].startswith(f"ecs-selftest-1-{c['Name']}-")
                  for c in one["Containers"]), json.dumps(one))
    ecs.stop_task(cluster=CLUSTER, task=task, reason="selftest")
    status, _, out = http("GET", world["agent_url"] + "/v1/tasks")
    lose_task = listed("selftest-lose")[0]
    check("/v1/tasks: a STOPPED task is left out", task not in [t["Arn"] for t in json.loads(out)["Tasks"]])
    status, _, out = http("GET", world["agent_url"] + "/v1/tasks?taskarn=" + lose_task)
    check("/v1/tasks?taskarn=ARN: that task", status == 200 and json.loads(out).get("Arn") == lose_task, f"{status} {out[:200]}")
    status, _, out = http("GET", world["agent_url"] + "/v1/tasks?taskarn=arn:aws:ecs:us-east-1:123456789012:task/nope")
    check("/v1/tasks?taskarn=unknown: 404", status == 404 and json.loads(out)["Arn"] == "", f"{status} {out}")
    status, _, _ = http("GET", world["agent_url"] + f"/v1/tasks?taskarn={lose_task}&dockerid=abc")
    check("/v1/tasks with taskarn and dockerid: 400", status == 400, str(status))

    # -- the agent's checkpoint (--ecs-data), stop / start
    saved = checkpoint(data_dir)
    check("--ecs-data: checkpoint written where the agent keeps it",
          saved is not None and saved.get("Version") == 28 and saved["Data"].get("EC2InstanceID") == node
          and saved["Data"].get("ContainerInstanceArn") == arn and saved["Data"].get("Cluster") == CLUSTER, str(saved))
    world.control("POST", "/agent/stop")
    stopped_refused = refused(world["agent_url"])
    time.sleep(0.2)
    still_down = refused(world["agent_url"])
    world.control("POST", "/agent/start")
    again = agent_arn(world)
    check("agent stop: refused until started; start: the same container instance",
          stopped_refused and still_down and again == arn, f"{stopped_refused} {still_down} {again} {arn}")

    # -- /node/replace: a new instance, IMDS follows (overrides kept), the agent re-registers
    status, replaced = world.control("POST", "/node/replace")
    new = replaced.get("instance_id") if status == 200 else None
    check("/node/replace answers a new instance", status == 200 and new and new != node
          and replaced.get("local_ipv4") == IP_OVERRIDE, f"{status} {replaced}")
    _, instance = imds_get(world, "/latest/meta-data/instance-id")
    _, ip = imds_get(world, "/latest/meta-data/local-ipv4")
    _, doc = imds_get(world, "/latest/dynamic/instance-identity/document")
    _, name_tag = imds_get(world, "/latest/meta-data/tags/instance/Name")
    check("/node/replace: IMDS serves the new instance, --imds-set kept",
          instance == new and ip == IP_OVERRIDE and json.loads(doc)["instanceId"] == new and name_tag == "l5d-demo-ecs",
          f"{instance} {ip} {name_tag}")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
    members = [i["InstanceId"] for i in group["Instances"]]
    check("/node/replace: the new instance is the group's, the old one detached", members == [new], str(members))
    check("/node/replace: the agent keeps serving until it restarts", agent_arn(world, 1) == arn)
    world.control("POST", "/agent/stop")
    world.control("POST", "/agent/start")
    after_replace = agent_arn(world)
    saved = checkpoint(data_dir) or {"Data": {}}
    described = ecs.describe_container_instances(cluster=CLUSTER, containerInstances=[after_replace])
    check("after /node/replace (checkpoint of another instance): a new container instance",
          after_replace and after_replace != arn and saved["Data"].get("EC2InstanceID") == new
          and saved["Data"].get("ContainerInstanceArn") == after_replace
          and described["containerInstances"][0]["ec2InstanceId"] == new, f"{after_replace} {saved}")
    world.control("POST", "/agent/stop")
    (data_dir / "ecs_agent_data.json").unlink()
    world.control("POST", "/agent/start")
    fresh = agent_arn(world)
    check("checkpoint deleted: a new container instance, checkpoint written again",
          fresh and fresh not in (arn, after_replace) and (checkpoint(data_dir) or {"Data": {}})["Data"].get(
              "ContainerInstanceArn") == fresh, f"{fresh}")


def run_fleet(world, root):
    """`--nodes 3`: an IMDS and an ECS agent per node, each agent registering its own instance."""
    nodes = world["nodes"]
    check("--nodes 3: three nodes, node 0 the single-node fields",
          len(nodes) == 3 and nodes[0]["instance_id"] == world["instance_id"]
          and nodes[0]["agent_url"] == world["agent_url"] and len({n["imds_url"] for n in nodes}) == 3, str(nodes))
    ids = [imds_get({"imds_url": n["imds_url"]}, "/latest/meta-data/instance-id")[1] for n in nodes]
    check("--nodes: each IMDS serves its own instance", ids == [n["instance_id"] for n in nodes], str(ids))
    check("--nodes: no agent before its node's ecs.config names the cluster",
          all(refused(n["agent_url"]) for n in nodes))
    for k in range(3):
        (root / f"node-{k}").mkdir(exist_ok=True)
        (root / f"node-{k}" / "ecs.config").write_text(f"ECS_CLUSTER={CLUSTER}\n")
    arns = [agent_arn({"agent_url": n["agent_url"]}) for n in nodes]
    ecs = world.client("ecs")
    described = ecs.describe_container_instances(cluster=CLUSTER, containerInstances=[a for a in arns if a])
    by_arn = {c["containerInstanceArn"]: c["ec2InstanceId"] for c in described["containerInstances"]}
    check("--nodes: each agent registers its own instance's container instance",
          all(arns) and [by_arn.get(a) for a in arns] == ids, f"{arns} {by_arn}")
    status, _ = world.control("POST", "/agent/stop?node=1")
    check("?node=1: that node's agent stops, the others serve",
          status == 200 and refused(nodes[1]["agent_url"]) and not refused(nodes[0]["agent_url"]))
    world.control("POST", "/agent/start?node=1")
    check("?node=1: started again, the same container instance", agent_arn({"agent_url": nodes[1]["agent_url"]}) == arns[1])
    status, body = world.control("POST", "/agent/stop?node=3")
    check("?node out of range: 400", status == 400, f"{status} {body}")
    ecs.register_task_definition(**TASKDEF)
    for arn in (arns[0], arns[0], arns[2]):
        ecs.start_task(cluster=CLUSTER, taskDefinition="selftest", containerInstances=[arn])
    status, tasks = world.control("GET", "/ecs/tasks")
    check("GET /ecs/tasks: running tasks per container instance and family",
          status == 200 and tasks["tasks"] == 3 and tasks["container_instances"].get(arns[0]) == {"selftest": 2}
          and tasks["container_instances"].get(arns[2]) == {"selftest": 1}, f"{status} {tasks}")


def main():
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="world-selftest-"))
    taskdefs, data_dir = root / "task-definitions", root / "ecs-data"
    taskdefs.mkdir()
    world = None
    try:
        world = World(root, ["--cluster", CLUSTER, "--servers", "0", "--stopped-servers", "0",
                             "--task-definitions", str(taskdefs), "--asg", ASG, "--imds-tags",
                             "--imds-set", f"local-ipv4={IP_OVERRIDE}", "--ecs-data", str(data_dir)])
        run(world, data_dir)
        world.stop()
        fleet_root = root / "fleet"
        fleet_root.mkdir()
        world = World(fleet_root, ["--cluster", CLUSTER, "--servers", "0", "--stopped-servers", "0",
                                   "--task-definitions", str(taskdefs), "--nodes", "3",
                                   "--ecs-config", str(fleet_root / "node-{node}" / "ecs.config")])
        run_fleet(world, fleet_root)
    except Exception as e:  # a check that could not even run
        import traceback
        traceback.print_exc()
        check("the self-test ran to the end", False, repr(e))
    finally:
        if world is not None:
            world.stop()
    took = time.monotonic() - t0
    if failures:
        print(f"{len(failures)} check(s) failed in {took:.1f} s; the world's log: {root / 'world.log'}")
        return 1
    print(f"all checks passed in {took:.1f} s")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
