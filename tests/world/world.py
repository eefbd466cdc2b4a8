#!/usr/bin/env python3
"""The nodeagent "test world": one process serving everything the node agent talks to.

    world.py serve [options]      (see --help)

Run it with the venv python printed by tests/world/setup.sh. When everything is
up it prints ONE line of JSON to stdout (URLs, ids, IPs, pid); logs go to stderr.
SIGTERM/SIGINT shut it down (exit 0). Only 127.0.0.1 is ever bound.
tests/world/world_selftest.py checks the knobs below against a running world.

What runs inside (one process, one thread per server):

* moto (the real AWS emulator, in-process, not a fixture) for EC2, ECS and Auto Scaling.
  A WSGI middleware counts every AWS request by operation ("ecs:StartTask",
  "ec2:DescribeInstances") and the time moto spent on it. ECS tasks are set to
  stay RUNNING until stopped (moto's default moves them to STOPPED at once).
  `populate` creates the cluster, registers packaging/task-definitions/*.json
  (`aws ecs register-task-definition --cli-input-json` format), and runs the
  Consul server instances (some then stopped) and this node's instance.

* A fault layer in the same middleware, off until configured (control API), because moto
  never throttles, never lags and always answers:
  - rules, POST /faults {"rules": [{"op": "ecs:StartTask" | "ecs:*" | "*", "fault": F,
    "times": N (default unlimited), "after": N (default 0), ...}]}, F one of
    throttle  the service's own throttling error, moto not called: ECS (JSON protocol) 400
              ThrottlingException + x-amzn-ErrorType; EC2 503 RequestLimitExceeded;
              Auto Scaling 400 Throttling (Sender);
    error     the service's server error (500), moto not called: ServerException /
              InternalError / InternalFailure;
    lose      moto does the call, then the connection is shut down before a byte of the
              answer (the client sees EOF);
    slow      "delay_ms": moto does the call, the answer waits delay_ms;
    lag       "lag_ms" (ecs:ListTasks, ecs:DescribeTasks): tasks started less than lag_ms ago
              are left out of ListTasks and answered as failures MISSING by DescribeTasks.
    Every matching call counts toward `after`; past it, the rule fires `times` times. A
    throttle/error ends the evaluation. GET /faults: the rules with `seen` and `fired`.
  - token buckets, POST /buckets {"groups": [{"name", "ops": [...], "burst", "rate"}]}:
    checked before the rules; a call whose group has no token left gets the throttle
    answer; tokens refill at `rate`/s up to `burst`. GET /buckets: tokens and `throttled`.

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
  issued so far become invalid) | down (connections refused, the port kept; ok
  brings it back) and delay_ms.

* The node's instance can be replaced (POST /node/replace): a new EC2 instance with the
  node's AMI and tags (in the --asg group instead of the old one), as when a baked disk
  boots as another instance. IMDS then serves the new instance (--imds-set overrides kept,
  /imds/items settings and tokens dropped) and the agent fixture registers with its id.

* ECS agent introspection fixture: follows the documented ECS container agent
  introspection API (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/ecs-agent-introspection.html):
  GET /v1/metadata, GET /v1/tasks (the tasks moto has on this container instance that are
  not STOPPED, ?taskarn= / ?dockerid= for one: 404 unknown, 400 both). Like a real agent that
  has not started yet, its port is bound but not listening (connection refused) until
  --agent-ready-after seconds have passed AND the --ecs-config file holds
  `ECS_CLUSTER=<name>`; it then registers a container instance in moto or restores
  it from its checkpoint, and listens. The checkpoint is in memory (per cluster), or with
  --ecs-data DIR the real agent's DIR/ecs_agent_data.json: a checkpoint naming another
  instance is ignored (new registration), one naming another cluster keeps the agent down.
  Going down saves it. A restart (control API) closes the socket and all connections, stays
  down for down_ms, then comes back on the same port through the same rules (so ready-after
  counts from then); stop keeps it down until start.

* A fleet (--nodes N): N node instances in moto, and for each its own IMDS fixture and ECS
  agent fixture on ports of their own (the agent reads ecs.config and keeps its checkpoint at
  paths with {node} replaced by the node's number), each agent registering its own instance's
  container instance. One thread accepts for every fixture port (Hub) and one ticks every agent
  (AgentClock; the registrations due run side by side on 16 workers), so hundreds of nodes cost
  a few threads, not hundreds. Node 0 is the one the
  single-node fields of the JSON line describe; "nodes" lists all of them.

* Control API (own port, so the fixtures stay faithful):
  POST /imds {"mode": ..., "delay_ms": N}; POST /imds/items {...}; POST /agent/restart
  {"down_ms": N}; POST /agent/stop; POST /agent/start; POST /node/replace; GET|POST /faults;
  GET|POST /buckets; GET /consul; GET /ecs/tasks (the cluster's running tasks per container
  instance and family, from moto); GET /stats (aws: total, by_operation, seconds, sequence,
  throttled, throttled_by_operation, faults_by_operation; imds; agent); POST /stats/reset
  (counters only; the agent timestamps, fault rules and buckets are kept). The IMDS and agent
  routes act on node 0, or on node K with ?node=K.
  Requests made by the world itself (populate, the agent fixture) are not counted, and no
  fault applies to them.
"""

import argparse
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import re
import secrets
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
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
IMDS_MODES = ("ok", "fail", "refuse-tokens", "expire-tokens", "down")
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
            self.aws_throttled, self.aws_throttled_by_op, self.aws_faults_by_op = 0, {}, {}
            self.imds_requests = self.token_requests = self.unauthorized = 0
            self.metadata_requests = 0

    def count(self, name):
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def aws(self, op, seconds, at, params, faults=(), bucket=None):
        """One AWS request received (answered by moto or by the fault layer); `faults` are the
        kinds of fault it got ("throttle", "error", "lose", "slow", "lag")."""
        with self.lock:
            entry = {"op": op, "at": at, "params": params}
            if faults:
                entry["fault"] = "+".join(faults)
                if bucket:
                    entry["bucket"] = bucket
                kinds = self.aws_faults_by_op.setdefault(op, {})
                for kind in faults:
                    kinds[kind] = kinds.get(kind, 0) + 1
                if "throttle" in faults:
                    self.aws_throttled += 1
                    self.aws_throttled_by_op[op] = self.aws_throttled_by_op.get(op, 0) + 1
            self.aws_sequence.append(entry)
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
                        "seconds": round(self.aws_seconds, 6), "sequence": list(self.aws_sequence),
                        "throttled": self.aws_throttled,
                        "throttled_by_operation": dict(self.aws_throttled_by_op),
                        "faults_by_operation": {op: dict(k) for op, k in self.aws_faults_by_op.items()}},
                "imds": {"requests": self.imds_requests, "token_requests": self.token_requests,
                         "unauthorized": self.unauthorized},
                "agent": {"ready_at": self.ready_at, "first_ok_at": self.first_ok_at,
                          "metadata_requests": self.metadata_requests},
            }


# ---------------------------------------------------------------- fault layer (in front of moto)

FAULT_KINDS = ("throttle", "error", "lose", "slow", "lag")
LAG_OPS = ("ecs:ListTasks", "ecs:DescribeTasks")
STARTING_OPS = ("ecs:StartTask", "ecs:RunTask")


def op_matches(pattern, op):
    """"ecs:StartTask" matches itself, "ecs:*" every ECS operation, "*" everything."""
    if pattern == "*":
        return True
    if pattern.endswith(":*"):
        return op.partition(":")[0] == pattern[:-2]
    return pattern == op


class Decision:
    """What the fault layer does to one call."""

    def __init__(self):
        self.answer = None  # "throttle" | "error": answered here, not passed to moto
        self.bucket = None  # the token bucket group that throttled it
        self.slow_ms = 0
        self.lose = False
        self.lag_ms = 0


class Faults:
    """Fault rules (POST /faults) and token buckets (POST /buckets), plus the start time of every
    task moto started, for `lag`. Thread-safe."""

    RULE_FIELDS = ("op", "fault", "times", "after", "delay_ms", "lag_ms")
    GROUP_FIELDS = ("name", "ops", "burst", "rate")

    def __init__(self):
        self.lock = threading.Lock()
        self.rules, self.groups = [], []
        self.started = {}  # task ARN -> time.monotonic() of the StartTask answer naming it

    # -- rules

    @staticmethod
    def integer(raw, name, default, minimum=0):
        value = raw.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    def parse_rule(self, raw):
        if not isinstance(raw, dict):
            raise ValueError(f"a rule is an object, got {raw!r}")
        unknown = sorted(set(raw) - set(self.RULE_FIELDS))
        if unknown:
            raise ValueError(f"unknown rule field(s) {unknown}; known: {list(self.RULE_FIELDS)}")
        op, fault = raw.get("op"), raw.get("fault")
        if not isinstance(op, str) or not op:
            raise ValueError('a rule needs "op": "ecs:StartTask", "ecs:*" or "*"')
        if fault not in FAULT_KINDS:
            raise ValueError(f"fault must be one of {list(FAULT_KINDS)}, got {fault!r}")
        rule = {"op": op, "fault": fault, "times": self.integer(raw, "times", None),
                "after": self.integer(raw, "after", 0)}
        for field, kind in (("delay_ms", "slow"), ("lag_ms", "lag")):
            if fault == kind:
                if field not in raw:
                    raise ValueError(f"a {kind} rule needs {field}")
                rule[field] = self.integer(raw, field, 0)
            elif field in raw:
                raise ValueError(f"{field} is for {kind} rules only")
        if fault == "lag" and not any(op_matches(op, lag_op) for lag_op in LAG_OPS):
            raise ValueError(f"lag rewrites {' and '.join(LAG_OPS)} answers; op must match one of them")
        rule.update(seen=0, fired=0)
        return rule

    def set_rules(self, rules):
        if not isinstance(rules, list):
            raise ValueError('body must be {"rules": [RULE, ...]}')
        parsed = [self.parse_rule(rule) for rule in rules]
        with self.lock:
            self.rules = parsed
        return self.rules_snapshot()

    def rules_snapshot(self):
        with self.lock:
            return {"rules": [dict(rule) for rule in self.rules]}

    # -- token buckets

    def parse_group(self, raw):
        if not isinstance(raw, dict):
            raise ValueError(f"a group is an object, got {raw!r}")
        unknown = sorted(set(raw) - set(self.GROUP_FIELDS))
        if unknown:
            raise ValueError(f"unknown group field(s) {unknown}; known: {list(self.GROUP_FIELDS)}")
        name, ops = raw.get("name"), raw.get("ops")
        if not isinstance(name, str) or not name:
            raise ValueError("a group needs a name")
        if not isinstance(ops, list) or not ops or not all(isinstance(op, str) and op for op in ops):
            raise ValueError(f"group {name}: ops must be a non-empty list of operations")
        numbers = {}
        for field in ("burst", "rate"):
            value = raw.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"group {name}: {field} must be a number >= 0, got {value!r}")
            numbers[field] = value
        return {"name": name, "ops": list(ops), "burst": numbers["burst"], "rate": numbers["rate"],
                "tokens": float(numbers["burst"]), "last": time.monotonic(), "throttled": 0}

    def set_groups(self, groups):
        if not isinstance(groups, list):
            raise ValueError('body must be {"groups": [GROUP, ...]}')
        parsed = [self.parse_group(group) for group in groups]
        with self.lock:
            self.groups = parsed
        return self.groups_snapshot()

    def refill(self, group, now):
        group["tokens"] = min(float(group["burst"]), group["tokens"] + (now - group["last"]) * group["rate"])
        group["last"] = now

    def groups_snapshot(self):
        with self.lock:
            now = time.monotonic()
            out = []
            for group in self.groups:
                self.refill(group, now)
                out.append({"name": group["name"], "ops": list(group["ops"]), "burst": group["burst"],
                            "rate": group["rate"], "tokens": round(group["tokens"], 3),
                            "throttled": group["throttled"]})
            return {"groups": out}

    # -- per call

    def decide(self, op):
        """Buckets first (a call a bucket throttles is not seen by the rules), then the rules in
        order: every matching rule counts the call; past `after` and under `times` it fires. A
        throttle or error answers the call, and later rules do not see it."""
        decision = Decision()
        with self.lock:
            now = time.monotonic()
            groups = [g for g in self.groups if any(op_matches(p, op) for p in g["ops"])]
            for group in groups:
                self.refill(group, now)
            empty = next((g for g in groups if g["tokens"] < 1.0), None)
            if empty is not None:
                empty["throttled"] += 1
                decision.answer, decision.bucket = "throttle", empty["name"]
                return decision
            for group in groups:
                group["tokens"] -= 1.0
            for rule in self.rules:
                if not op_matches(rule["op"], op) or (rule["fault"] == "lag" and op not in LAG_OPS):
                    continue
                rule["seen"] += 1
                if rule["seen"] <= rule["after"] or (rule["times"] is not None and rule["fired"] >= rule["times"]):
                    continue
                rule["fired"] += 1
                kind = rule["fault"]
                if kind in ("throttle", "error"):
                    decision.answer = kind
                    break
                if kind == "slow":
                    decision.slow_ms += rule["delay_ms"]
                elif kind == "lose":
                    decision.lose = True
                elif kind == "lag":
                    decision.lag_ms = max(decision.lag_ms, rule["lag_ms"])
        return decision

    def record_started(self, doc):
        """Remember when each task of a StartTask/RunTask answer was started."""
        now = time.monotonic()
        with self.lock:
            for task in doc.get("tasks") or []:
                if isinstance(task, dict) and task.get("taskArn"):
                    self.started[task["taskArn"]] = now
            if len(self.started) > 20000:  # bounded: forget the oldest half
                for arn, _ in sorted(self.started.items(), key=lambda kv: kv[1])[:10000]:
                    del self.started[arn]

    def hide_young(self, op, doc, lag_ms):
        """Rewrite a ListTasks/DescribeTasks answer as ECS answers right after a StartTask: tasks
        started less than lag_ms ago are not listed, and DescribeTasks names them in `failures`
        with reason MISSING. Returns how many were hidden."""
        now = time.monotonic()
        with self.lock:
            young = {arn for arn, at in self.started.items() if now - at < lag_ms / 1000}
        if not young:
            return 0
        if op == "ecs:ListTasks":
            arns = doc.get("taskArns") or []
            doc["taskArns"] = [arn for arn in arns if arn not in young]
            return len(arns) - len(doc["taskArns"])
        tasks = doc.get("tasks") or []
        missing = [t for t in tasks if t.get("taskArn") in young]
        if missing:
            doc["tasks"] = [t for t in tasks if t.get("taskArn") not in young]
            doc["failures"] = (doc.get("failures") or []) + [{"arn": t["taskArn"], "reason": "MISSING"} for t in missing]
        return len(missing)


def fault_answer(kind, service, json_protocol):
    """(status, headers, body) of the service's own throttling ("throttle") or server ("error")
    error, in its protocol's error shape."""
    request_id = str(uuid.uuid4())
    throttle = kind == "throttle"
    if json_protocol:  # awsJson (ECS): the error code in __type and in x-amzn-ErrorType
        code, message = ("ThrottlingException", "Rate exceeded") if throttle else \
            ("ServerException", "Service encountered an internal error.")
        status = "400 Bad Request" if throttle else "500 Internal Server Error"
        body = json.dumps({"__type": code, "message": message}, separators=(",", ":"))
        headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", request_id),
                   ("x-amzn-ErrorType", code)]
    elif service == "ec2":  # ec2Query: <Response><Errors><Error>, 503 for throttling
        code, message = ("RequestLimitExceeded", "Request limit exceeded.") if throttle else \
            ("InternalError", "An internal error has occurred.")
        status = "503 Service Unavailable" if throttle else "500 Internal Server Error"
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                f'<Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>')
        headers = [("Content-Type", "text/xml;charset=UTF-8")]
    else:  # awsQuery (Auto Scaling): <ErrorResponse><Error><Type>
        xmlns = {"autoscaling": ' xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"'}.get(service, "")
        side, code, message = ("Sender", "Throttling", "Rate exceeded") if throttle else \
            ("Receiver", "InternalFailure", "An internal error occurred.")
        status = "400 Bad Request" if throttle else "500 Internal Server Error"
        body = (f"<ErrorResponse{xmlns}><Error><Type>{side}</Type><Code>{code}</Code><Message>{message}</Message>"
                f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>")
        headers = [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)]
    body = body.encode()
    return status, headers + [("Content-Length", str(len(body)))], body


# ---------------------------------------------------------------- moto (AWS)

class AwsRecorder:
    """WSGI middleware in front of moto: records operation name and duration, and applies the
    fault layer (rules and token buckets) to every request but the world's own."""

    TARGET_PREFIXES = {"AmazonEC2ContainerServiceV20141113": "ecs"}

    def __init__(self, app, stats, faults):
        self.app, self.stats, self.faults = app, stats, faults

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
        (op, params), at = self.operation(environ, body), time.time()
        if INTERNAL_UA in environ.get("HTTP_USER_AGENT", ""):  # the world's own: no faults, not counted
            return self.answer(environ, start_response, op)
        decision, faults, seconds = self.faults.decide(op), [], 0.0
        try:
            if decision.slow_ms:
                faults.append("slow")
            if decision.answer:  # throttle / error: answered here, moto never sees the call
                faults.append(decision.answer)
                if decision.slow_ms:
                    time.sleep(decision.slow_ms / 1000)
                service = op.partition(":")[0]
                status, headers, out = fault_answer(decision.answer, service, bool(environ.get("HTTP_X_AMZ_TARGET")))
                start_response(status, headers)
                return [out]
            started = time.perf_counter()
            status, headers, out = self.call_moto(environ, op)
            seconds = time.perf_counter() - started
            if op.startswith("ecs:") and out.startswith(b"{") and (op in STARTING_OPS or decision.lag_ms):
                doc = json.loads(out)
                if op in STARTING_OPS:
                    self.faults.record_started(doc)
                if decision.lag_ms and op in LAG_OPS and self.faults.hide_young(op, doc, decision.lag_ms):
                    faults.append("lag")
                    out = json.dumps(doc).encode()
                    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                    headers.append(("Content-Length", str(len(out))))
            if decision.slow_ms:
                time.sleep(decision.slow_ms / 1000)
            if decision.lose:
                # moto did the work; now the connection goes before a byte of the answer.
                faults.append("lose")
                sock = environ.get("werkzeug.socket")
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                # werkzeug's write of the status line then fails (EPIPE), which it treats
                # as a client that went away.
                start_response(status, headers)
                return []
            start_response(status, headers)
            return [out]
        except Exception as e:  # a moto bug/limitation: answer 500 like werkzeug would, log one line
            log.warning("moto raised on %s: %r", op, e)
            log.debug("moto traceback", exc_info=True)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
            return [f"moto raised {e!r}".encode()]
        finally:
            self.stats.aws(op, seconds, at, params, faults, decision.bucket)

    def answer(self, environ, start_response, op):
        """moto's answer, as is (the world's own requests)."""
        try:
            status, headers, out = self.call_moto(environ, op)
        except Exception as e:
            log.warning("moto raised on %s (world's own request): %r", op, e)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
            return [f"moto raised {e!r}".encode()]
        start_response(status, headers)
        return [out]

    def call_moto(self, environ, op):
        """Run moto on the request; (status, headers, body), ECS answers typed."""
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers)

        out = b"".join(self.app(environ, capture))
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        if op.startswith("ecs:"):
            out = self.typed_ecs_body(out)
        headers.append(("Content-Length", str(len(out))))
        return captured["status"], headers, out

    @staticmethod
    def typed_ecs_body(body):
        """moto 5.2 writes a task container's `cpu` and `memory` as JSON numbers; the ECS API
        (and so every SDK but boto3, which does not check) has them as strings. Fix that one
        deviation so typed SDKs can parse DescribeTasks/StartTask/StopTask answers."""
        if not body.startswith(b"{"):
            return body
        doc = json.loads(body)
        tasks = doc.get("tasks") or ([doc["task"]] if isinstance(doc.get("task"), dict) else [])
        for task in tasks:
            for container in task.get("containers", []):
                for key in ("cpu", "memory", "memoryReservation"):
                    if isinstance(container.get(key), int):
                        container[key] = str(container[key])
        return json.dumps(doc).encode()

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


def start_moto(stats, faults):
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, AwsRecorder(app, stats, faults), threaded=True)
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
    """Create the cluster, task definitions and instances; return (node instances (`--nodes`
    of them), server IPs, stopped IPs)."""
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
        node_ids = [node_id]
    else:
        node_ids = [i["InstanceId"] for i in run(node_tags, args.nodes)]
    found = {}
    for page in ec2.get_paginator("describe_instances").paginate(InstanceIds=node_ids):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                found[instance["InstanceId"]] = instance
    nodes = [found[i] for i in node_ids]
    return nodes, [i["PrivateIpAddress"] for i in servers], [i["PrivateIpAddress"] for i in stopped]


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

    def reply_json(self, status, obj, ctype="application/json"):
        self.reply(status, json.dumps(obj), ctype)

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
        self.conns, self.conns_lock = set(), threading.Lock()
        self.server_bind()
        if activate:
            self.server_activate()

    def server_bind(self):  # HTTPServer's would call socket.getfqdn(): a DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request, client_address):
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self):
        with self.conns_lock:
            conns, self.conns = list(self.conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.debug("connection error from %s", client_address, exc_info=True)


def serve(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


class Hub:
    """One thread that accepts connections for the fixtures' listening sockets (a fleet's IMDS
    and ECS agents are hundreds of ports: one thread each would wake hundreds of times a second
    for nothing). It waits in epoll on every registered socket; a connection is handed to the
    server's own per-connection thread, as `serve_forever` would. Registering and unregistering
    are done by the hub's thread itself (woken through a pipe), so `remove` returns only once
    the socket is no longer watched and may be closed."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.lock, self.requests = threading.Lock(), []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        threading.Thread(target=self.run, name="hub", daemon=True).start()

    def add(self, server):
        self.request("add", server)

    def remove(self, server):
        self.request("remove", server)

    def request(self, action, server):
        done = threading.Event()
        with self.lock:
            self.requests.append((action, server, done))
        os.write(self.wake_w, b"x")
        done.wait()

    def run(self):
        while True:
            for key, _ in self.selector.select():
                if key.data is not None:
                    key.data._handle_request_noblock()  # accept; the connection gets its thread
                    continue
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                with self.lock:
                    requests, self.requests = self.requests, []
                for action, server, done in requests:
                    try:
                        if action == "add":
                            self.selector.register(server.socket, selectors.EVENT_READ, server)
                        else:
                            self.selector.unregister(server.socket)
                    except (KeyError, ValueError, OSError) as e:  # the hub keeps serving the others
                        log.warning("hub: cannot %s a listening socket: %r", action, e)
                    finally:
                        done.set()


HUB = None
HUB_LOCK = threading.Lock()


def hub():
    global HUB
    with HUB_LOCK:
        if HUB is None:
            HUB = Hub()
        return HUB


class Listener:
    """A fixture's port, up (listening) or down: bound but not listening, so connections are
    refused while the port number stays reserved. Going down also drops open connections.
    Connections are accepted by the shared Hub."""

    def __init__(self, fixture, up=True, port=0):
        self.fixture, self.lock = fixture, threading.Lock()
        self.server = Server(fixture, port, activate=False)
        self.port, self.up = self.server.server_port, False
        if up:
            self.start()

    def start(self):
        with self.lock:
            if not self.up:
                self.server.server_activate()
                hub().add(self.server)
                self.up = True

    def stop(self):
        with self.lock:
            if self.up:
                hub().remove(self.server)
                self.server.server_close()
                self.server.drop_connections()
                self.server = Server(self.fixture, self.port, activate=False)
                self.up = False

    def close(self):
        self.stop()
        with self.lock:
            self.server.server_close()


# ---------------------------------------------------------------- IMDSv2 fixture

class Imds:
    server_header = "EC2ws"  # what the real IMDS sends

    def __init__(self, items, identity, user_data, stats):
        self.items, self.identity, self.user_data, self.stats = items, identity, user_data, stats
        self.lock = threading.Lock()
        self.tokens = {}  # token -> monotonic expiry
        self.mode, self.delay_ms = "ok", 0
        self.listener = Listener(self)
        self.port = self.listener.port

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

    def replace(self, items, identity):
        """Serve another instance (POST /node/replace): its items and identity document; the
        old instance's tokens are not valid on the new one."""
        with self.lock:
            self.items, self.identity = items, identity
            self.tokens.clear()

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
            answer = {"mode": self.mode, "delay_ms": self.delay_ms, "port": self.port}
        if mode == "down":  # connections refused, the port kept
            self.listener.stop()
        elif mode is not None:
            self.listener.start()
        return answer

    def close(self):
        self.listener.close()

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

class AgentRefuses(Exception):
    """The agent would exit at start-up (a checkpoint of another cluster, a corrupt checkpoint)."""


def fake_docker_id(task_arn, name):
    return hashlib.sha256(f"{task_arn}/{name}".encode()).hexdigest()


class Agent:
    DATA_FILE = "ecs_agent_data.json"  # in ECS_DATADIR, /var/lib/ecs/data on a real instance
    DATA_VERSION = 28
    # /v1/tasks is written without a Content-Type by the real agent; Go's net/http sniffs the JSON as text.
    TASKS_CTYPE = "text/plain; charset=utf-8"
    # What the agent's v1 handler marshals for an unknown task (an empty TaskResponse), with a 404.
    EMPTY_TASK = {"Arn": "", "KnownStatus": "", "Family": "", "Version": "", "Containers": None}

    def __init__(self, args, moto_url, instance_id, zone, stats, ecs_config=None, ecs_data=None, port=0):
        """`ecs_config`, `ecs_data`: this node's (a fleet's nodes each have their own); `port`:
        0 for any free one. Driven by an AgentClock's tick()."""
        self.ecs_config, self.default_cluster = ecs_config, args.cluster
        self.ready_after, self.stats = args.agent_ready_after, stats
        self.instance_id, self.zone = instance_id, zone
        self.data_dir = Path(ecs_data) if ecs_data else None
        self.ecs = aws_client("ecs", moto_url)
        self.lock = threading.Lock()
        # Bound, not listening: connection refused. --agent-port 51678 (the real agent's) in a
        # network namespace of the test's own, where the default introspection_url works.
        self.listener = Listener(self, up=False, port=port)
        self.port = self.listener.port
        self.up = self.stopped = False
        self.earliest = time.monotonic() + self.ready_after
        self.retry_at = 0.0  # after a failed registration (or no cluster yet): not before
        self.checkpoint = {}  # without --ecs-data: cluster -> {"arn": ..., "instance_id": ...}
        self.cluster = self.arn = self.up_instance_id = None
        self.container_names = {}  # task definition ARN -> its container names
        self.last_error = None

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

    def complain(self, message):
        if message != self.last_error:
            log.warning("agent: %s", message)
            self.last_error = message

    # -- the checkpoint

    def data_path(self):
        return self.data_dir / self.DATA_FILE

    def restore(self, cluster, instance_id):
        """The container instance ARN the checkpoint holds for this cluster and instance, or
        None (register a new one), as the real agent decides at start-up."""
        if self.data_dir is None:
            saved = self.checkpoint.get(cluster)
            if saved and saved["instance_id"] != instance_id:
                log.info("agent: checkpoint of instance %s, this is %s: registering anew", saved["instance_id"], instance_id)
                return None
            return saved and saved["arn"]
        try:
            text = self.data_path().read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AgentRefuses(f"Error reading existing state file: {e}")
        try:
            data = json.loads(text).get("Data") or {}
        except (ValueError, AttributeError) as e:
            raise AgentRefuses(f"Could not unmarshal existing state; corrupted data?: {e}")
        saved_id, saved_cluster = data.get("EC2InstanceID") or "", data.get("Cluster") or ""
        if saved_id and saved_id != instance_id:
            log.warning("agent: Data mismatch; saved InstanceID '%s' does not match current InstanceID '%s'. "
                        "Overwriting old datafile", saved_id, instance_id)
            return None
        if saved_cluster and saved_cluster != cluster:
            raise AgentRefuses(f"Data mismatch; saved cluster '{saved_cluster}' does not match configured cluster "
                               f"'{cluster}'. Perhaps you want to delete the configured checkpoint file?")
        return data.get("ContainerInstanceArn") or None

    def save(self, cluster, arn, instance_id):
        if self.data_dir is None:
            self.checkpoint[cluster] = {"arn": arn, "instance_id": instance_id}
            return
        doc = {"Data": {"ACSSeqNum": 1, "AvailabilityZone": self.zone or "", "Cluster": cluster,
                        "ContainerInstanceArn": arn, "EC2InstanceID": instance_id,
                        "TaskEngine": {"Tasks": [], "IdToContainer": {}, "IdToTask": {}, "ImageStates": [],
                                       "ENIAttachments": None, "IPToTask": {}}},
               "Version": self.DATA_VERSION}
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)  # ecs-init creates it before the agent starts
            tmp = self.data_dir / f".{self.DATA_FILE}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))  # compact, as Go marshals it
            os.replace(tmp, self.data_path())
        except OSError as e:
            log.warning("agent: cannot save its state in %s: %s", self.data_dir, e)

    def register(self, cluster):
        with self.lock:
            instance_id = self.instance_id
        try:
            arn = self.restore(cluster, instance_id)
        except AgentRefuses as e:
            self.complain(str(e))
            return None
        if arn:
            log.info("agent: restored %s", arn)
        else:
            doc = {"instanceId": instance_id, "region": REGION}
            try:
                resp = self.ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(doc))
            except Exception as e:
                self.complain(f"cannot register container instance in {cluster!r}: {e}")
                return None
            arn = resp["containerInstance"]["containerInstanceArn"]
            log.info("agent: registered %s (instance %s)", arn, instance_id)
        self.save(cluster, arn, instance_id)
        return arn, instance_id

    # -- up and down

    def due(self):
        """Called with self.lock held."""
        return not self.up and not self.stopped and time.monotonic() >= self.earliest

    def wants_tick(self):
        """Whether tick() has something to do now."""
        with self.lock:
            return self.due() and time.monotonic() >= self.retry_at

    def tick(self):
        """Comes up when due: ecs.config names a cluster and the registration (or the
        checkpoint) gives a container instance; else tries again a second later, like the real
        agent's registration retries."""
        if not self.wants_tick():
            return
        cluster = self.configured_cluster()
        registered = cluster and self.register(cluster)
        if not registered:
            self.retry_at = time.monotonic() + 1.0
            return
        with self.lock:
            if not self.due():  # stopped or restarted meanwhile
                return
            self.cluster, (self.arn, self.up_instance_id) = cluster, registered
            self.last_error = None
            self.listener.start()
            self.up = True
            self.stats.agent_ready()
        log.info("agent: up on port %d (cluster %s)", self.port, cluster)

    def go_down(self):
        """Save the checkpoint (as the agent does when it is stopped), close the listening
        socket and every open connection; keep the port bound. Called with self.lock held."""
        if self.up:
            self.save(self.cluster, self.arn, self.up_instance_id)
            self.listener.stop()
            self.up = False

    def restart(self, down_ms):
        with self.lock:
            self.go_down()
            self.stopped = False
            self.earliest = time.monotonic() + down_ms / 1000 + self.ready_after
        log.info("agent: restarted, down for %d ms", down_ms)

    def stop(self):
        with self.lock:
            self.go_down()
            self.stopped = True
        log.info("agent: stopped")

    def start(self):
        with self.lock:
            if self.up or not self.stopped:
                return {"ok": True, "port": self.port, "up": self.up}
            self.stopped = False
            self.earliest = time.monotonic() + self.ready_after
        log.info("agent: started")
        return {"ok": True, "port": self.port, "up": False}

    def set_instance(self, instance_id, zone):
        """The node is another instance now (POST /node/replace); the agent finds out at its next start."""
        with self.lock:
            self.instance_id, self.zone = instance_id, zone

    def close(self):
        with self.lock:
            self.stopped = True
            self.go_down()
        self.listener.close()

    # -- the introspection API

    def handle(self, h):
        with self.lock:
            cluster, arn = self.cluster, self.arn
        url = urllib.parse.urlsplit(h.path)
        if h.command == "GET" and url.path == "/v1/metadata":
            h.reply_json(200, {"Cluster": cluster, "ContainerInstanceArn": arn, "Version": AGENT_VERSION})
            self.stats.agent_metadata_ok()
        elif h.command == "GET" and url.path == "/v1/tasks":
            self.tasks_answer(h, urllib.parse.parse_qs(url.query, keep_blank_values=True), cluster, arn)
        else:
            h.reply(404, "404 page not found\n")

    def tasks_answer(self, h, query, cluster, arn):
        docker_id = query.get("dockerid", [None])[0]
        task_arn = query.get("taskarn", [None])[0]
        if docker_id is not None and task_arn is not None:
            return h.reply(400, b"", self.TASKS_CTYPE)
        try:
            tasks = self.local_tasks(cluster, arn)
        except Exception as e:
            log.warning("agent: cannot list this instance's tasks in moto: %r", e)
            return h.reply(500, "{}", self.TASKS_CTYPE)
        if task_arn is not None:
            found = [t for t in tasks if t["Arn"] == task_arn]
        elif docker_id is not None:
            found = [t for t in tasks if any(c["DockerId"] == docker_id if len(docker_id) > 12
                                             else c["DockerId"].startswith(docker_id) for c in t["Containers"])]
            if len(found) > 1:
                return h.reply(400, b"", self.TASKS_CTYPE)
        else:
            return h.reply_json(200, {"Tasks": tasks}, self.TASKS_CTYPE)
        if not found:
            return h.reply_json(404, self.EMPTY_TASK, self.TASKS_CTYPE)
        return h.reply_json(200, found[0], self.TASKS_CTYPE)

    def task_container_names(self, taskdef_arn):
        names = self.container_names.get(taskdef_arn)
        if names is None:
            taskdef = self.ecs.describe_task_definition(taskDefinition=taskdef_arn)["taskDefinition"]
            names = self.container_names[taskdef_arn] = [c["name"] for c in taskdef.get("containerDefinitions", [])]
        return names

    def local_tasks(self, cluster, arn):
        """The tasks ECS (moto) places on this container instance that are not STOPPED, in the
        introspection API's format: what the local agent knows, at once (no eventual consistency)."""
        if not cluster or not arn:
            return []
        arns, token = [], None
        while True:
            page = self.ecs.list_tasks(cluster=cluster, containerInstance=arn, **({"nextToken": token} if token else {}))
            arns += page.get("taskArns", [])
            token = page.get("nextToken")
            if not token:
                break
        described = {}
        for i in range(0, len(arns), 100):
            for task in self.ecs.describe_tasks(cluster=cluster, tasks=arns[i:i + 100]).get("tasks", []):
                described[task["taskArn"]] = task
        out = []
        for task_arn in arns:
            task = described.get(task_arn)
            if not task or task.get("lastStatus") == "STOPPED":
                continue
            family, _, version = task.get("taskDefinitionArn", "").rpartition("/")[2].partition(":")
            try:
                names = self.task_container_names(task["taskDefinitionArn"])
            except Exception:
                names = [c.get("name") for c in task.get("containers", []) if c.get("name")]
            containers = []
            for name in names:
                docker_id = fake_docker_id(task_arn, name)
                containers.append({"DockerId": docker_id,
                                   "DockerName": f"ecs-{family}-{version}-{name}-{docker_id[-20:]}",
                                   "Name": name})
            out.append({"Arn": task_arn, "DesiredStatus": task.get("desiredStatus", "RUNNING"),
                        "KnownStatus": task.get("lastStatus", "RUNNING"), "Family": family, "Version": version,
                        "Containers": containers})
        return out


class AgentClock:
    """One thread that ticks every agent fixture (a fleet has hundreds): every 20 ms for one
    node, every 100 ms for a fleet (the real agent takes seconds to register anyway). The agents
    that have something to do are ticked side by side, as real nodes' agents register each on
    its own: one after another, a fleet's last registration waited for every other's."""

    WORKERS = 16

    def __init__(self, agents):
        self.agents, self.stopping = agents, threading.Event()
        self.period = 0.02 if len(agents) == 1 else 0.1
        threading.Thread(target=self.run, name="agents", daemon=True).start()

    @staticmethod
    def tick(agent):
        try:
            agent.tick()
        except Exception as e:  # one agent's trouble must not stop the others
            log.warning("agent: tick failed: %r", e)

    def run(self):
        with concurrent.futures.ThreadPoolExecutor(self.WORKERS, thread_name_prefix="agent") as pool:
            while not self.stopping.wait(self.period):
                list(pool.map(self.tick, [a for a in self.agents if a.wants_tick()]))

    def close(self):
        self.stopping.set()
        for agent in self.agents:
            agent.close()


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


# ---------------------------------------------------------------- the node's instance

class Node:
    """This node's EC2 instance, and its replacement by a new one (POST /node/replace): the
    same disk (AMI) booted as another instance, as after an AMI bake."""

    def __init__(self, args, moto_url, instance, overrides, imds, agent):
        self.args, self.moto_url, self.instance = args, moto_url, instance
        self.overrides, self.imds, self.agent = overrides, imds, agent
        self.lock = threading.Lock()

    def replace(self):
        with self.lock:
            old = self.instance
            if not old:
                raise Conflict("no node instance to replace (--no-populate)")
            ec2 = aws_client("ec2", self.moto_url)
            tags = [t for t in old.get("Tags", []) if not t["Key"].startswith("aws:")]  # aws: tags are AWS's own
            launch = {"ImageId": old["ImageId"], "MinCount": 1, "MaxCount": 1,
                      "InstanceType": old.get("InstanceType", "t3.medium")}
            if old.get("SubnetId"):
                launch["SubnetId"] = old["SubnetId"]
            if tags:
                launch["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
            new_id = ec2.run_instances(**launch)["Instances"][0]["InstanceId"]
            if self.args.asg:
                asg = aws_client("autoscaling", self.moto_url)
                asg.detach_instances(InstanceIds=[old["InstanceId"]], AutoScalingGroupName=self.args.asg,
                                     ShouldDecrementDesiredCapacity=True)
                asg.attach_instances(InstanceIds=[new_id], AutoScalingGroupName=self.args.asg)
            new = ec2.describe_instances(InstanceIds=[new_id])["Reservations"][0]["Instances"][0]
            items = imds_items(new, self.overrides, self.args.imds_tags)
            self.imds.replace(items, identity_document(items, new))
            self.agent.set_instance(items.get("instance-id"), items.get("placement/availability-zone"))
            self.instance = new
            log.info("node: %s replaced by %s", old["InstanceId"], new_id)
            return {"instance_id": items.get("instance-id"), "local_ipv4": items.get("local-ipv4"),
                    "previous_instance_id": old["InstanceId"]}


# ---------------------------------------------------------------- control API

class Conflict(Exception):
    """A control request that cannot be done in the world's current state (409)."""


class Control:
    """The control API. The IMDS and agent routes act on node 0, or on node K with `?node=K`
    (a fleet, `--nodes`); /node/replace on node 0 only."""

    def __init__(self, imdses, agents, consul, stats, faults, node, moto_url, cluster):
        self.imdses, self.agents, self.consul, self.stats = imdses, agents, consul, stats
        self.faults, self.node, self.moto_url, self.cluster = faults, node, moto_url, cluster

    def pick(self, url):
        """This request's node: `?node=K`, 0 by default."""
        raw = urllib.parse.parse_qs(url.query).get("node", ["0"])[0]
        if not raw.isdigit() or int(raw) >= len(self.agents):
            raise ValueError(f"node must be 0..{len(self.agents) - 1}, got {raw!r}")
        return int(raw)

    def ecs_tasks(self):
        """The cluster's tasks whose desired status is RUNNING and that have not stopped, per
        container instance and family, straight from moto (uncounted): the fleet benchmark's
        duplicates are families with more than one."""
        ecs = aws_client("ecs", self.moto_url)
        arns = []
        for page in ecs.get_paginator("list_tasks").paginate(cluster=self.cluster, desiredStatus="RUNNING"):
            arns += page.get("taskArns", [])
        out = {}
        for i in range(0, len(arns), 100):
            for task in ecs.describe_tasks(cluster=self.cluster, tasks=arns[i:i + 100]).get("tasks", []):
                if task.get("lastStatus") == "STOPPED":
                    continue
                family = task.get("taskDefinitionArn", "").rpartition("/")[2].partition(":")[0]
                families = out.setdefault(task.get("containerInstanceArn") or "", {})
                families[family] = families.get(family, 0) + 1
        return {"tasks": sum(sum(f.values()) for f in out.values()), "container_instances": out}

    def handle(self, h):
        try:
            body = json.loads(h.read_body() or b"{}")
        except ValueError:
            return h.reply_json(400, {"error": "body must be JSON"})
        url = urllib.parse.urlsplit(h.path)
        route = (h.command, url.path)
        try:
            if route[1].startswith(("/imds", "/agent")):
                k = self.pick(url)
                imds, agent = self.imdses[k], self.agents[k]
            if route == ("GET", "/ecs/tasks"):
                return h.reply_json(200, self.ecs_tasks())
            if route == ("GET", "/stats"):
                return h.reply_json(200, self.stats.snapshot())
            if route == ("POST", "/stats/reset"):
                self.stats.reset()
                return h.reply_json(200, {"ok": True})
            if route == ("POST", "/imds"):
                return h.reply_json(200, imds.configure(body.get("mode"), body.get("delay_ms")))
            if route == ("POST", "/imds/items"):
                return h.reply_json(200, imds.set_items(body))
            if route == ("GET", "/consul"):
                return h.reply_json(200, self.consul.snapshot())
            if route == ("POST", "/agent/restart"):
                agent.restart(int(body.get("down_ms", 0)))
                return h.reply_json(200, {"ok": True, "port": agent.port})
            if route == ("POST", "/agent/stop"):
                agent.stop()
                return h.reply_json(200, {"ok": True, "port": agent.port})
            if route == ("POST", "/agent/start"):
                return h.reply_json(200, agent.start())
            if route == ("GET", "/faults"):
                return h.reply_json(200, self.faults.rules_snapshot())
            if route == ("POST", "/faults"):
                return h.reply_json(200, self.faults.set_rules(body.get("rules")))
            if route == ("GET", "/buckets"):
                return h.reply_json(200, self.faults.groups_snapshot())
            if route == ("POST", "/buckets"):
                return h.reply_json(200, self.faults.set_groups(body.get("groups")))
            if route == ("POST", "/node/replace"):
                return h.reply_json(200, self.node.replace())
        except (ValueError, TypeError, AttributeError) as e:
            return h.reply_json(400, {"error": str(e)})
        except Conflict as e:
            return h.reply_json(409, {"error": str(e)})
        except Exception as e:  # e.g. moto refusing a call of /node/replace
            log.warning("control %s %s failed: %r", route[0], route[1], e)
            return h.reply_json(500, {"error": repr(e)})
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
    s.add_argument("--ecs-config", help="agent comes up only once this file has ECS_CLUSTER=<name>; "
                                         "with --nodes > 1 it must hold {node} (the node's number)")
    s.add_argument("--agent-ready-after", type=float, default=0.0, metavar="SECONDS")
    s.add_argument("--agent-port", type=int, default=0, metavar="PORT",
                   help="the agent fixture's port (default: any free one; the real agent's is 51678)")
    s.add_argument("--ecs-data", metavar="DIR",
                   help="the agent keeps its checkpoint in DIR/ecs_agent_data.json (ECS_DATADIR), "
                        "not in memory; with --nodes > 1 it must hold {node}")
    s.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="N node instances (a fleet), each with an IMDS and an ECS agent fixture on "
                        "ports of its own; node 0 is the one the single-node fields describe")
    s.add_argument("--imds-set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override/add a meta-data item, KEY relative to /latest/meta-data/")
    s.add_argument("--user-data", metavar="FILE")
    s.add_argument("--imds-tags", action="store_true", help="serve tags under meta-data/tags/instance/")
    s.add_argument("--asg", metavar="NAME", help="the node is the instance of this autoscaling group")
    s.add_argument("--lifecycle-hook", metavar="NAME", help="with --asg: a terminating lifecycle hook")
    s.add_argument("--no-populate", action="store_true")
    s.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.nodes > 1:
        if args.asg or args.no_populate or args.agent_port:
            p.error("--nodes > 1 does not go with --asg, --no-populate or --agent-port")
        for flag, value in (("--ecs-config", args.ecs_config), ("--ecs-data", args.ecs_data)):
            if value and "{node}" not in value:
                p.error(f"with --nodes > 1, {flag} must hold {{node}} (each node has its own)")
    return args


def per_node(template, k):
    """A per-node path: `{node}` replaced by the node's number."""
    return template.replace("{node}", str(k)) if template else template


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

    stats, faults = Stats(), Faults()
    state_manager.set_transition(model_name="ecs::task", transition={"progression": "manual", "times": 10**9})
    moto_server, moto_url = start_moto(stats, faults)
    nodes, server_ips, stopped_ips = ([], [], []) if args.no_populate else populate(args, moto_url)

    imdses, agents, described = [], [], []
    for k, node in enumerate(nodes or [None]):
        items = imds_items(node, overrides, args.imds_tags)
        imdses.append(Imds(items, identity_document(items, node), args.user_data, stats))
        agents.append(Agent(args, moto_url, items.get("instance-id", "i-0000000000000000f"),
                            items.get("placement/availability-zone"), stats,
                            ecs_config=per_node(args.ecs_config, k), ecs_data=per_node(args.ecs_data, k),
                            port=args.agent_port))
        described.append({"instance_id": items.get("instance-id"), "local_ipv4": items.get("local-ipv4"),
                          "imds_url": f"http://127.0.0.1:{imdses[-1].port}",
                          "agent_url": f"http://127.0.0.1:{agents[-1].port}"})
    clock = AgentClock(agents)
    imds, agent = imdses[0], agents[0]
    consul = Consul()
    consul_server = Server(consul)
    serve(consul_server)
    control_server = Server(Control(imdses, agents, consul, stats, faults,
                                    Node(args, moto_url, nodes[0] if nodes else None, overrides, imds, agent),
                                    moto_url, args.cluster))
    serve(control_server)
    stats.reset()
    serving.set()
    out.write(json.dumps({
        "moto_url": moto_url,
        "imds_url": described[0]["imds_url"],
        "agent_url": described[0]["agent_url"],
        "control_url": f"http://127.0.0.1:{control_server.server_port}",
        "consul_url": f"http://127.0.0.1:{consul_server.server_port}",
        "region": REGION,
        "cluster": args.cluster,
        "instance_id": described[0]["instance_id"],
        "local_ipv4": described[0]["local_ipv4"],
        "server_ips": server_ips,
        "stopped_server_ips": stopped_ips,
        "nodes": described,
        "pid": os.getpid(),
    }) + "\n")
    out.flush()

    while not stop.wait(0.2):
        pass
    log.info("shutting down")
    clock.close()
    for imds in imdses:
        imds.close()
    for server in (control_server, consul_server, moto_server):
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: freeing moto's state takes ~1 s
