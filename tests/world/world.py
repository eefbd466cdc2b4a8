#!/usr/bin/env python3
"""The nodeagent "test world": one process serving everything the node agent talks to.

    world.py serve [options]      (see --help)

Run it with the venv python printed by tests/world/setup.sh. When everything is
up it prints ONE line of JSON to stdout (URLs, ids, IPs, pid); logs go to stderr.
SIGTERM/SIGINT shut it down (exit 0). Only 127.0.0.1 is ever bound.

What runs inside (one process, one thread per server):

* moto (the real AWS emulator, in-process, not a fixture) for EC2 and ECS. A WSGI
  middleware counts every AWS request by operation ("ecs:StartTask",
  "ec2:DescribeInstances") and the time moto spent on it. ECS tasks are set to
  stay RUNNING until stopped (moto's default moves them to STOPPED at once).
  `populate` creates the cluster, registers packaging/task-definitions/*.json
  (`aws ecs register-task-definition --cli-input-json` format), and runs the
  Consul server instances (some then stopped) and this node's instance.

* IMDSv2 fixture: follows the documented EC2 instance metadata service API
  (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html):
  `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..21600,
  else 400) returns a token; every GET needs a valid `X-aws-ec2-metadata-token`
  (IMDSv2 required: no/invalid/expired token -> 401). Serves /latest/meta-data/...
  (values taken from moto's record of the node instance, directory listings as
  newline-separated names, instance tags under tags/instance/ with --imds-tags),
  /latest/dynamic/instance-identity/document and /latest/user-data.
  Knobs: --imds-set, --user-data, --imds-tags; at run time (control API) the
  modes ok | fail (500) | refuse-tokens (403 on PUT) | expire-tokens (all tokens
  issued so far become invalid) and delay_ms.

* ECS agent introspection fixture: follows the documented ECS container agent
  introspection API (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/ecs-agent-introspection.html):
  GET /v1/metadata, GET /v1/tasks. Like a real agent that has not started yet,
  its port is bound but not listening (connection refused) until
  --agent-ready-after seconds have passed AND the --ecs-config file holds
  `ECS_CLUSTER=<name>`; it then registers a container instance in moto (once per
  cluster, like the agent's checkpoint) and listens. A restart (control API)
  closes the socket and all connections, stays down for down_ms, then comes back
  on the same port through the same rules (so ready-after counts from then).

* Control API (own port, so the fixtures stay faithful):
  POST /imds {"mode": ..., "delay_ms": N}; POST /agent/restart {"down_ms": N};
  GET /stats; POST /stats/reset (counters only; the agent timestamps are kept).
  Requests made by the world itself (populate, agent registration) are not counted.
"""

import argparse
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
from botocore.config import Config
from moto.moto_api import state_manager
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
INTERNAL_UA = "nodeagent-world-internal"  # marks the world's own AWS requests
REPO = Path(__file__).resolve().parents[2]
IMDS_MODES = ("ok", "fail", "refuse-tokens", "expire-tokens")
AGENT_VERSION = "Amazon ECS Agent - v1.89.0 (nodeagent test fixture)"

log = logging.getLogger("world")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ready_at = None
        self.first_ok_at = None
        self.reset()

    def reset(self):
        with self.lock:
            self.aws_total, self.aws_by_op, self.aws_seconds = 0, {}, 0.0
            self.aws_sequence = []
            self.imds_requests = self.token_requests = self.unauthorized = 0
            self.metadata_requests = 0

    def count(self, name):
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def aws(self, op, seconds, at, params):
        with self.lock:
            self.aws_sequence.append({"op": op, "at": at, "params": params})
            self.aws_total += 1
            self.aws_by_op[op] = self.aws_by_op.get(op, 0) + 1
            self.aws_seconds += seconds

    def agent_ready(self):
        with self.lock:
            self.ready_at, self.first_ok_at = time.time(), None

    def agent_metadata_ok(self):
        with self.lock:
            self.metadata_requests += 1
            if self.first_ok_at is None:
                self.first_ok_at = time.time()

    def snapshot(self):
        with self.lock:
            return {
                "aws": {"total": self.aws_total, "by_operation": dict(self.aws_by_op),
                        "seconds": round(self.aws_seconds, 6), "sequence": list(self.aws_sequence)},
                "imds": {"requests": self.imds_requests, "token_requests": self.token_requests,
                         "unauthorized": self.unauthorized},
                "agent": {"ready_at": self.ready_at, "first_ok_at": self.first_ok_at,
                          "metadata_requests": self.metadata_requests},
            }


# ---------------------------------------------------------------- moto (AWS)

class AwsRecorder:
    """WSGI middleware in front of moto: records operation name and duration."""

    TARGET_PREFIXES = {"AmazonEC2ContainerServiceV20141113": "ecs"}

    def __init__(self, app, stats):
        self.app, self.stats = app, stats

    def __call__(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH")
        if length:
            body = environ["wsgi.input"].read(int(length))
        elif environ.get("wsgi.input_terminated"):
            body = environ["wsgi.input"].read()
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        (op, params), started, at = self.operation(environ, body), time.perf_counter(), time.time()
        try:
            if op.startswith("ecs:"):
                return self.typed_ecs_response(environ, start_response)
            return self.app(environ, start_response)
        except Exception as e:  # a moto bug/limitation: answer 500 like werkzeug would, log one line
            log.warning("moto raised on %s: %r", op, e)
            log.debug("moto traceback", exc_info=True)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
            return [f"moto raised {e!r}".encode()]
        finally:
            if INTERNAL_UA not in environ.get("HTTP_USER_AGENT", ""):
                self.stats.aws(op, time.perf_counter() - started, at, params)

    def typed_ecs_response(self, environ, start_response):
        """moto 5.2 writes a task container's `cpu` and `memory` as JSON numbers; the ECS API
        (and so every SDK but boto3, which does not check) has them as strings. Fix that one
        deviation so typed SDKs can parse DescribeTasks/StartTask/StopTask answers."""
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)

        body = b"".join(self.app(environ, capture))
        if body.startswith(b"{"):
            doc = json.loads(body)
            tasks = doc.get("tasks") or ([doc["task"]] if isinstance(doc.get("task"), dict) else [])
            for task in tasks:
                for container in task.get("containers", []):
                    for key in ("cpu", "memory", "memoryReservation"):
                        if isinstance(container.get(key), int):
                            container[key] = str(container[key])
            body = json.dumps(doc).encode()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]

    def operation(self, environ, body):
        scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(1) if scope else None
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target:  # JSON protocol (ECS): X-Amz-Target: AmazonEC2ContainerServiceV20141113.StartTask
            prefix, _, action = target.rpartition(".")
            service = service or self.TARGET_PREFIXES.get(prefix, prefix.lower())
            try:
                params = json.loads(body or b"{}")
            except ValueError:
                params = {}
        else:  # query protocol (EC2, Auto Scaling): Action=… in the form body or query string
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            if "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
                query.update(urllib.parse.parse_qs(body.decode("utf-8", "replace")))
            action = query.get("Action", ["?"])[0]
            params = {k: v[0] for k, v in query.items()}
        return f"{service or '?'}:{action}", params


def start_moto(stats):
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, AwsRecorder(app, stats), threaded=True)
    serve(server)
    return server, f"http://127.0.0.1:{server.server_port}"


def aws_client(service, moto_url):
    return boto3.client(
        service, region_name=REGION, endpoint_url=moto_url,
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(user_agent_extra=INTERNAL_UA, retries={"total_max_attempts": 1}),
    )


def parse_tag(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return {"Key": key, "Value": value}


def populate(args, moto_url):
    """Create the cluster, task definitions and instances; return (node instance, server IPs, stopped IPs)."""
    ecs, ec2 = aws_client("ecs", moto_url), aws_client("ec2", moto_url)
    ecs.create_cluster(clusterName=args.cluster)
    taskdefs = Path(args.task_definitions)
    if taskdefs.is_dir():
        for path in sorted(taskdefs.glob("*.json")):
            try:
                family = ecs.register_task_definition(**json.loads(path.read_text()))["taskDefinition"]["family"]
            except Exception as e:
                raise SystemExit(f"world: cannot register task definition {path}: {e}")
            log.info("registered task definition %s from %s", family, path.name)
    else:
        log.info("no task definitions directory at %s; registering none", taskdefs)

    # An Amazon Linux 2 AMI from moto's catalogue (describing all ~1200 images takes seconds).
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["amzn2-ami-hvm-*"]}])["Images"]
    image_id = sorted(i["ImageId"] for i in images or ec2.describe_images()["Images"])[0]

    def run(tags, count):
        if count <= 0:
            return []
        return ec2.run_instances(
            ImageId=image_id, MinCount=count, MaxCount=count, InstanceType="t3.medium",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"]

    servers = run([args.server_tag], args.servers)
    stopped = run([args.server_tag], args.stopped_servers)
    if stopped:
        ec2.stop_instances(InstanceIds=[i["InstanceId"] for i in stopped])
    node_tags = args.node_tag or [parse_tag("Name=l5d-demo-ecs")]
    if args.asg:
        # The node is the one instance of an autoscaling group (with, optionally, a
        # terminating lifecycle hook), as on a real ECS cluster.
        asg = aws_client("autoscaling", moto_url)
        asg.create_launch_configuration(LaunchConfigurationName=f"{args.asg}-lc", ImageId=image_id,
                                        InstanceType="t3.medium")
        asg.create_auto_scaling_group(AutoScalingGroupName=args.asg, LaunchConfigurationName=f"{args.asg}-lc",
                                      MinSize=1, MaxSize=1, DesiredCapacity=1,
                                      AvailabilityZones=[f"{REGION}a"])
        node_id = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[args.asg])[
            "AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
        ec2.create_tags(Resources=[node_id], Tags=node_tags)
        if args.lifecycle_hook:
            asg.put_lifecycle_hook(LifecycleHookName=args.lifecycle_hook, AutoScalingGroupName=args.asg,
                                   LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")
    else:
        node_id = run(node_tags, 1)[0]["InstanceId"]
    node = ec2.describe_instances(InstanceIds=[node_id])["Reservations"][0]["Instances"][0]
    return node, [i["PrivateIpAddress"] for i in servers], [i["PrivateIpAddress"] for i in stopped]


# ---------------------------------------------------------------- HTTP plumbing

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real services
    # Headers and body are two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK (40 ms) on a kept-alive connection, a delay no real service adds.
    disable_nagle_algorithm = True

    def version_string(self):
        return getattr(self.server.fixture, "server_header", "nodeagent-world")

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.server.server_port, fmt % args)

    def finish(self):
        super().finish()
        closed = getattr(self.server.fixture, "connection_closed", None)
        if closed:
            closed(self.connection)

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status, body=b"", ctype="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status, obj):
        self.reply(status, json.dumps(obj), "application/json")

    def dispatch(self):
        try:
            self.server.fixture.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = dispatch


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, fixture, port=0, activate=True):
        super().__init__(("127.0.0.1", port), Handler, bind_and_activate=False)
        self.fixture = fixture
        self.server_bind()
        if activate:
            self.server_activate()

    def server_bind(self):  # HTTPServer's would call socket.getfqdn(): a DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request, client_address):
        log.debug("connection error from %s", client_address, exc_info=True)


def serve(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


# ---------------------------------------------------------------- IMDSv2 fixture

class Imds:
    server_header = "EC2ws"  # what the real IMDS sends

    def __init__(self, items, identity, user_data, stats):
        self.items, self.identity, self.user_data, self.stats = items, identity, user_data, stats
        self.lock = threading.Lock()
        self.tokens = {}  # token -> monotonic expiry
        self.mode, self.delay_ms = "ok", 0

    def set_items(self, items):
        """Sets (a string) or removes (null) meta-data items, e.g. a spot interruption notice."""
        with self.lock:
            for key, value in items.items():
                key = key.strip("/")
                if value is None:
                    self.items.pop(key, None)
                else:
                    self.items[key] = str(value)
            return {"items": sorted(self.items)}

    def configure(self, mode=None, delay_ms=None):
        with self.lock:
            if mode is not None:
                if mode not in IMDS_MODES:
                    raise ValueError(f"mode must be one of {IMDS_MODES}")
                self.mode = mode
                if mode == "expire-tokens":
                    self.tokens.clear()
            if delay_ms is not None:
                self.delay_ms = max(0, int(delay_ms))
            return {"mode": self.mode, "delay_ms": self.delay_ms}

    def token_valid(self, token):
        with self.lock:
            expiry = self.tokens.get(token or "")
            return expiry is not None and time.monotonic() < expiry

    def lookup(self, rel):
        """A meta-data item's value, or a directory listing, or None."""
        if rel in self.items:
            return self.items[rel]
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        children = {}
        for key in self.items:
            if key.startswith(prefix):
                head, sep, _ = key[len(prefix):].partition("/")
                children[head + sep] = True
        return "\n".join(sorted(children)) if children else None

    def handle(self, h):
        self.stats.count("imds_requests")
        h.read_body()
        with self.lock:
            mode, delay_ms = self.mode, self.delay_ms
        if delay_ms:
            time.sleep(delay_ms / 1000)
        if mode == "fail":
            return h.reply(500, "Internal Server Error")
        path = urllib.parse.urlsplit(h.path).path

        if path == "/latest/api/token":
            if h.command != "PUT":
                return h.reply(405, "Method Not Allowed")
            self.stats.count("token_requests")
            if mode == "refuse-tokens" or "X-Forwarded-For" in h.headers:
                return h.reply(403, "Forbidden")
            ttl = h.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.strip().isdigit() or not 1 <= int(ttl) <= 21600:
                return h.reply(400, "Bad Request")
            token = secrets.token_urlsafe(42)
            with self.lock:
                self.tokens[token] = time.monotonic() + int(ttl)
            return h.reply(200, token, headers=[("X-aws-ec2-metadata-token-ttl-seconds", str(int(ttl)))])

        if h.command not in ("GET", "HEAD"):
            return h.reply(405, "Method Not Allowed")
        if not self.token_valid(h.headers.get("X-aws-ec2-metadata-token")):
            self.stats.count("unauthorized")
            return h.reply(401, "Unauthorized")

        body = None
        if path == "/latest/meta-data" or path.startswith("/latest/meta-data/"):
            with self.lock:
                body = self.lookup(path[len("/latest/meta-data"):].lstrip("/"))
        elif path == "/latest/dynamic/instance-identity/document":
            body = json.dumps(self.identity, indent=2)
        elif path == "/latest/user-data" and self.user_data and Path(self.user_data).is_file():
            body = Path(self.user_data).read_bytes()
        if body is None:
            return h.reply(404, "Not Found")
        return h.reply(200, body)


def imds_items(node, overrides, with_tags):
    items = {}
    if node:
        nics = node.get("NetworkInterfaces") or [{}]
        items = {
            "ami-id": node.get("ImageId"),
            "instance-id": node.get("InstanceId"),
            "instance-type": node.get("InstanceType"),
            "local-hostname": node.get("PrivateDnsName"),
            "local-ipv4": node.get("PrivateIpAddress"),
            "mac": nics[0].get("MacAddress"),
            "placement/availability-zone": node.get("Placement", {}).get("AvailabilityZone"),
            "placement/region": REGION,
        }
        if with_tags:
            for tag in node.get("Tags", []):
                items[f"tags/instance/{tag['Key']}"] = tag["Value"]
    items = {k: v for k, v in items.items() if v is not None}
    items.update(overrides)
    return items


def identity_document(items, node):
    launch = node.get("LaunchTime") if node else None
    return {
        "accountId": ACCOUNT_ID,
        "architecture": "x86_64",
        "availabilityZone": items.get("placement/availability-zone"),
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": items.get("ami-id"),
        "instanceId": items.get("instance-id"),
        "instanceType": items.get("instance-type"),
        "kernelId": None,
        "pendingTime": launch.strftime("%Y-%m-%dT%H:%M:%SZ") if launch else None,
        "privateIp": items.get("local-ipv4"),
        "ramdiskId": None,
        "region": items.get("placement/region"),
        "version": "2017-09-30",
    }


# ---------------------------------------------------------------- ECS agent introspection fixture

class Agent:
    def __init__(self, args, moto_url, instance_id, stats):
        self.ecs_config, self.default_cluster = args.ecs_config, args.cluster
        self.ready_after, self.instance_id, self.stats = args.agent_ready_after, instance_id, stats
        self.ecs = aws_client("ecs", moto_url)
        self.lock = threading.Lock()
        self.server = Server(self, activate=False)  # bound, not listening: connection refused
        self.port = self.server.server_port
        self.up = False
        self.earliest = time.monotonic() + self.ready_after
        self.checkpoint = {}  # cluster -> container instance ARN
        self.cluster = self.arn = None
        self.conns = set()
        self.stopping = threading.Event()
        self.last_error = None
        threading.Thread(target=self.supervise, daemon=True).start()

    def configured_cluster(self):
        if not self.ecs_config:
            return self.default_cluster
        try:
            text = Path(self.ecs_config).read_text()
        except OSError:
            return None
        cluster = None
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "ECS_CLUSTER" and value.strip():
                cluster = value.strip()
        return cluster

    def register(self, cluster):
        if cluster not in self.checkpoint:
            doc = {"instanceId": self.instance_id, "region": REGION}
            try:
                resp = self.ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(doc))
            except Exception as e:
                if str(e) != self.last_error:
                    log.warning("agent: cannot register container instance in %r: %s", cluster, e)
                    self.last_error = str(e)
                return None
            self.checkpoint[cluster] = resp["containerInstance"]["containerInstanceArn"]
            log.info("agent: registered %s", self.checkpoint[cluster])
        return self.checkpoint[cluster]

    def supervise(self):
        while not self.stopping.wait(0.02):
            with self.lock:
                if self.up or time.monotonic() < self.earliest:
                    continue
            cluster = self.configured_cluster()
            arn = cluster and self.register(cluster)
            if not arn:
                self.stopping.wait(1.0)  # back off like the real agent's registration retries
                continue
            with self.lock:
                if self.up or time.monotonic() < self.earliest:  # restarted meanwhile
                    continue
                self.cluster, self.arn = cluster, arn
                self.server.server_activate()
                serve(self.server)
                self.up = True
                self.stats.agent_ready()
            log.info("agent: up on port %d (cluster %s)", self.port, cluster)

    def go_down(self):
        """Close the listening socket and every open connection; keep the port bound.

        Called with self.lock held."""
        if self.up:
            self.server.shutdown()
            self.server.server_close()
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()
            self.up = False
            self.server = Server(self, self.port, activate=False)

    def restart(self, down_ms):
        with self.lock:
            self.go_down()
            self.earliest = time.monotonic() + down_ms / 1000 + self.ready_after
        log.info("agent: restarted, down for %d ms", down_ms)

    def close(self):
        self.stopping.set()
        with self.lock:
            self.go_down()
            self.server.server_close()

    def connection_closed(self, conn):
        with self.lock:
            self.conns.discard(conn)

    def handle(self, h):
        with self.lock:
            self.conns.add(h.connection)
            cluster, arn = self.cluster, self.arn
        path = urllib.parse.urlsplit(h.path).path
        if h.command == "GET" and path == "/v1/metadata":
            h.reply_json(200, {"Cluster": cluster, "ContainerInstanceArn": arn, "Version": AGENT_VERSION})
            self.stats.agent_metadata_ok()
        elif h.command == "GET" and path == "/v1/tasks":
            h.reply_json(200, {"Tasks": []})
        else:
            h.reply(404, "404 page not found\n")


# ---------------------------------------------------------------- Consul agent HTTP API fixture

class Consul:
    """The local Consul agent's HTTP API, the endpoints nodeagent uses
    (https://developer.hashicorp.com/consul/api-docs/agent): PUT /v1/agent/maintenance
    (?enable=true|false&reason=...), PUT /v1/agent/leave, and GET /v1/status/leader. Every call
    is recorded with its time (epoch seconds) for the control API's GET /consul."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.maintenance = False
        self.left = False

    def snapshot(self):
        with self.lock:
            return {"calls": list(self.calls), "maintenance": self.maintenance, "left": self.left}

    def handle(self, h):
        h.read_body()
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        route = (h.command, url.path)
        with self.lock:
            if route == ("PUT", "/v1/agent/maintenance"):
                enable = query.get("enable", [""])[0]
                if enable not in ("true", "false"):
                    return h.reply(400, "Missing value for enable")
                self.maintenance = enable == "true"
                self.calls.append({"call": "maintenance", "enable": self.maintenance,
                                   "reason": query.get("reason", [""])[0], "at": time.time()})
                return h.reply(200, "")
            if route == ("PUT", "/v1/agent/leave"):
                self.left = True
                self.calls.append({"call": "leave", "at": time.time()})
                return h.reply(200, "")
            if route == ("GET", "/v1/status/leader"):
                return h.reply_json(200, "" if self.left else "10.0.0.10:8300")
        if url.path in ("/v1/agent/maintenance", "/v1/agent/leave"):
            return h.reply(405, "method not allowed")
        return h.reply(404, "404 page not found")


# ---------------------------------------------------------------- control API

class Control:
    def __init__(self, imds, agent, consul, stats):
        self.imds, self.agent, self.consul, self.stats = imds, agent, consul, stats

    def handle(self, h):
        try:
            body = json.loads(h.read_body() or b"{}")
        except ValueError:
            return h.reply_json(400, {"error": "body must be JSON"})
        route = (h.command, urllib.parse.urlsplit(h.path).path)
        try:
            if route == ("GET", "/stats"):
                return h.reply_json(200, self.stats.snapshot())
            if route == ("POST", "/stats/reset"):
                self.stats.reset()
                return h.reply_json(200, {"ok": True})
            if route == ("POST", "/imds"):
                return h.reply_json(200, self.imds.configure(body.get("mode"), body.get("delay_ms")))
            if route == ("POST", "/imds/items"):
                return h.reply_json(200, self.imds.set_items(body))
            if route == ("GET", "/consul"):
                return h.reply_json(200, self.consul.snapshot())
            if route == ("POST", "/agent/restart"):
                self.agent.restart(int(body.get("down_ms", 0)))
                return h.reply_json(200, {"ok": True, "port": self.agent.port})
        except (ValueError, TypeError) as e:
            return h.reply_json(400, {"error": str(e)})
        h.reply_json(404, {"error": f"no route {route[0]} {route[1]}"})


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the world until SIGTERM/SIGINT")
    s.add_argument("--cluster", default="l5d-demo")
    s.add_argument("--servers", type=int, default=2)
    s.add_argument("--stopped-servers", type=int, default=1)
    s.add_argument("--server-tag", type=parse_tag, default=parse_tag("Name=l5d-demo-consul-server"))
    s.add_argument("--node-tag", type=parse_tag, action="append", metavar="KEY=VALUE",
                   help="a tag of this node's instance (repeatable; default Name=l5d-demo-ecs)")
    s.add_argument("--task-definitions", default=str(REPO / "packaging" / "task-definitions"))
    s.add_argument("--ecs-config", help="agent comes up only once this file has ECS_CLUSTER=<name>")
    s.add_argument("--agent-ready-after", type=float, default=0.0, metavar="SECONDS")
    s.add_argument("--imds-set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override/add a meta-data item, KEY relative to /latest/meta-data/")
    s.add_argument("--user-data", metavar="FILE")
    s.add_argument("--imds-tags", action="store_true", help="serve tags under meta-data/tags/instance/")
    s.add_argument("--asg", metavar="NAME", help="the node is the instance of this autoscaling group")
    s.add_argument("--lifecycle-hook", metavar="NAME", help="with --asg: a terminating lifecycle hook")
    s.add_argument("--no-populate", action="store_true")
    s.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="world: %(message)s")
    for noisy in ("werkzeug", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out, sys.stdout = sys.stdout, sys.stderr  # nothing but the JSON line may reach stdout
    stop, serving = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before serving there is nothing to shut down
        signal.signal(sig, lambda *_: stop.set() if serving.is_set() else os._exit(0))

    overrides = {}
    for item in args.imds_set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip("/"):
            raise SystemExit(f"world: --imds-set expects KEY=VALUE, got {item!r}")
        overrides[key.strip("/")] = value

    stats = Stats()
    state_manager.set_transition(model_name="ecs::task", transition={"progression": "manual", "times": 10**9})
    moto_server, moto_url = start_moto(stats)
    node, server_ips, stopped_ips = (None, [], []) if args.no_populate else populate(args, moto_url)

    items = imds_items(node, overrides, args.imds_tags)
    imds = Imds(items, identity_document(items, node), args.user_data, stats)
    imds_server = Server(imds)
    serve(imds_server)
    agent = Agent(args, moto_url, items.get("instance-id", "i-0000000000000000f"), stats)
    consul = Consul()
    consul_server = Server(consul)
    serve(consul_server)
    control_server = Server(Control(imds, agent, consul, stats))
    serve(control_server)
    stats.reset()
    serving.set()
    out.write(json.dumps({
        "moto_url": moto_url,
        "imds_url": f"http://127.0.0.1:{imds_server.server_port}",
        "agent_url": f"http://127.0.0.1:{agent.port}",
        "control_url": f"http://127.0.0.1:{control_server.server_port}",
        "consul_url": f"http://127.0.0.1:{consul_server.server_port}",
        "region": REGION,
        "cluster": args.cluster,
        "instance_id": items.get("instance-id"),
        "local_ipv4": items.get("local-ipv4"),
        "server_ips": server_ips,
        "stopped_server_ips": stopped_ips,
        "pid": os.getpid(),
    }) + "\n")
    out.flush()

    while not stop.wait(0.2):
        pass
    log.info("shutting down")
    agent.close()
    for server in (control_server, consul_server, imds_server, moto_server):
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: freeing moto's state takes ~1 s
