#!/usr/bin/env python3
"""The chaos soak's engine (run by tests/soak.sh DURATION, which sets up the network namespace,
the venv, dockerd and the build, and passes what it made here).

Two nodes, each with its own test world (world.py serve) and a long-running `nodeagent run`:
- an ECS-runtime node (its tasks are ECS tasks in the world's moto; no Docker engine);
- a docker-runtime node: the DEFAULT task configuration on a private engine run by the faithful
  stand-ins (tests/world/standins.sh), listening on the real ports of 127.0.0.1 in the soak's
  own network namespace — as tests/support/node.rs makes it.

One scheduler thread per node injects faults drawn from a seeded RNG (SOAK_SEED): throttle
bursts, lost StartTask answers, ListTasks/DescribeTasks lag, slow answers and 500s (the world's
fault layer), IMDS slow or expiring its tokens, ECS agent restarts, task stops (ECS), container
kills and removals, dockerd restarts and freezes (SIGSTOP), SIGKILL of nodeagent then a restart.
After each fault it measures how long the node takes to be healthy again (`nodeagent status`
exit 0 and one copy of each task) and holds it to the fault's bound.

A checker thread looks every second: at most one running copy of each task (moto, through the
world's unfaulted internal client; Docker, through `docker ps`), every rendered file parses
(JSON, YAML, `sh -n`), each nodeagent alive unless the schedule killed it, and its RSS and fd
count from /proc. RSS and fds of each node's last agent are compared between its first minute
and the soak's last minute (SIGKILLs are only scheduled while that leaves the last agent two
minutes of life).

Violations are printed as they happen (stdout); the fault log goes to stderr; the last line on
stdout is the one summary line. Exit 1 on any violation. Every process started here is
recorded in WORK/pids and stopped by its PID on exit (soak.sh's trap does the same as a backstop).
"""

import argparse
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import yaml
from botocore.config import Config

HERE = Path(__file__).resolve().parent
TASKS = ("consul-agent", "consul-registrator", "linkerd")
INTERNAL_UA = "nodeagent-world-internal"  # world.py: requests with it are never faulted or counted
RENDERED = ("opt/consul/config/consul-agent.json", "opt/consul-registrator/bin/start.sh",
            "etc/linkerd/linkerd.yaml")
KILL_TAIL = 130  # no SIGKILL of nodeagent this close to the end: its successor must live 2 min

T0 = time.monotonic()
PRINT = threading.Lock()


def now():
    return time.monotonic() - T0


def note(msg):
    with PRINT:
        print(f"soak: [{now():6.1f} s] {msg}", file=sys.stderr, flush=True)


class Soak:
    """What every thread shares: the violations, the fault count, the recoveries, the stop flag."""

    def __init__(self, work):
        self.lock = threading.Lock()
        self.violations = []
        self.faults = 0
        self.recoveries = []  # (node, fault, seconds)
        self.stopping = threading.Event()
        self.interrupted = False
        self.pids = work / "pids"

    def violation(self, msg):
        if self.interrupted:
            return  # the teardown of an interrupted soak is no finding
        with self.lock:
            self.violations.append(msg)
        with PRINT:
            print(f"soak: VIOLATION at {now():.1f} s: {msg}", flush=True)

    def register(self, pid, what):
        with self.lock, open(self.pids, "a") as f:
            f.write(f"{pid} {what}\n")


def stop_pid(proc, sig=signal.SIGTERM, wait=15):
    """Stops a Popen by its PID: `sig`, then SIGKILL after `wait` s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


# ---------------------------------------------------------------- the worlds

class World:
    def __init__(self, soak, py, work, name, args):
        self.name = name
        self.log = open(work / f"{name}-world.log", "w")
        self.proc = subprocess.Popen([py, str(HERE / "world.py"), "serve", *args],
                                     stdout=subprocess.PIPE, stderr=self.log)
        soak.register(self.proc.pid, f"world {name}")
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise SystemExit(f"soak: the {name} world did not start; see {work / (name + '-world.log')}")
        self.info = json.loads(line)
        self.ecs = boto3.client("ecs", region_name=self.info["region"], endpoint_url=self.info["moto_url"],
                                aws_access_key_id="testing", aws_secret_access_key="testing",
                                config=Config(user_agent_extra=INTERNAL_UA, retries={"total_max_attempts": 1},
                                              read_timeout=10, connect_timeout=5))
        self.ecs_lock = threading.Lock()  # boto3 clients are thread-safe; moto is happier serial

    def control(self, method, path, body=None):
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.info["control_url"] + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def faults(self, rules):
        self.control("POST", "/faults", {"rules": rules})

    def imds(self, **body):
        self.control("POST", "/imds", body)

    def live_tasks(self):
        """family -> [ARN] of the live tasks on this world's container instance (moto's truth)."""
        with self.ecs_lock:
            cluster = self.info["cluster"]
            cis = self.ecs.list_container_instances(cluster=cluster)["containerInstanceArns"]
            if not cis:
                return {}
            arns = self.ecs.list_tasks(cluster=cluster, containerInstance=cis[0],
                                       desiredStatus="RUNNING")["taskArns"]
            tasks = self.ecs.describe_tasks(cluster=cluster, tasks=arns)["tasks"] if arns else []
        out = {}
        for t in tasks:
            if t.get("desiredStatus") == "RUNNING" and t.get("lastStatus") != "STOPPED":
                family = t["taskDefinitionArn"].rsplit("/", 1)[1].split(":")[0]
                out.setdefault(family, []).append(t["taskArn"])
        return out

    def stop_task(self, arn):
        """ECS stops a task (its container died, say): the world's own, unfaulted call."""
        with self.ecs_lock:
            self.ecs.stop_task(cluster=self.info["cluster"], task=arn, reason="soak: the task died")

    def close(self):
        stop_pid(self.proc, signal.SIGTERM, 10)
        self.log.close()


# ---------------------------------------------------------------- nodeagent

class Agent:
    """A long-running `nodeagent run` of a node; restarted by the schedule after a SIGKILL."""

    def __init__(self, soak, node, bin_path, args, env):
        self.soak, self.node, self.bin, self.args, self.env = soak, node, bin_path, args, env
        self.proc = None
        self.expected_down = False
        self.generation = 0
        self.lock = threading.Lock()

    def start(self):
        with self.lock:
            self.generation += 1
            log = open(self.node.root / f"agent-{self.generation}.log", "w")
            self.proc = subprocess.Popen([self.bin, "run", *self.args, "--root", str(self.node.root)],
                                         env=self.env, stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=lambda: os.umask(0o027))
            log.close()
            self.soak.register(self.proc.pid, f"nodeagent {self.node.name}")
            self.expected_down = False

    def sigkill(self):
        with self.lock:
            self.expected_down = True
            if self.proc and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        with self.lock:
            self.expected_down = True
            stop_pid(self.proc, signal.SIGTERM, 15)

    def pid(self):
        p = self.proc
        return p.pid if p is not None and p.poll() is None else None

    def exited(self):
        """The exit code when it exited without the schedule asking."""
        with self.lock:
            if self.expected_down or self.proc is None:
                return None
            return self.proc.poll()

    def status(self):
        """(exit code, document) of `nodeagent status --json`."""
        try:
            out = subprocess.run([self.bin, "status", "--json", "--root", str(self.node.root)],
                                 capture_output=True, timeout=8, env=self.env)
        except subprocess.TimeoutExpired:
            return None, None
        try:
            doc = json.loads(out.stdout) if out.returncode in (0, 1) else None
        except ValueError:
            doc = None
        return out.returncode, doc


def proc_sample(pid):
    """(RSS in kB, open fds) of a process, from /proc; None if it is gone."""
    try:
        rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, ValueError):
        return None


def parse_problem(path):
    """Why a rendered file does not parse, if it does not (a missing file is fine)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path}: {e}"
    try:
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".yaml":
            if not data.strip():
                return f"{path} is empty"
            yaml.safe_load(data)
        elif path.suffix == ".sh":
            ok = subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0
            if not ok or not data.startswith(b"#!") or not data.endswith(b"\n"):
                return f"{path} is not a whole shell script"
    except Exception as e:  # noqa: BLE001 - any parse error is the finding
        return f"{path} does not parse: {e}"
    return None


# ---------------------------------------------------------------- the nodes

class Node:
    """What both nodes share: a world, a root, an agent, samples, the fault schedule."""

    name = "?"

    def __init__(self, soak, args, rng):
        self.soak, self.args, self.rng = soak, args, rng
        self.samples = []  # (t, pid, rss kB, fds)
        self.faults = 0
        self.disrupted = None

    def env(self):
        env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "AWS_PROFILE")}
        env.update({"AWS_ENDPOINT_URL": self.world.info["moto_url"],
                    "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.world.info["imds_url"],
                    "AWS_REGION": self.world.info["region"],
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
        return env

    def counts(self):
        """task -> running copies; None when it cannot be told now."""
        raise NotImplementedError

    def healthy(self):
        code, doc = self.agent.status()
        if code != 0 or not doc or doc.get("healthy") is not True:
            return False
        counts = self.counts()
        return counts is not None and all(counts.get(t) == 1 for t in TASKS)

    def wait_healthy(self, bound):
        """Seconds until healthy, or None past `bound`."""
        start = time.monotonic()
        while time.monotonic() - start < bound:
            if self.healthy():
                return time.monotonic() - start
            time.sleep(0.25)
        return None

    def check(self):
        """One look of the checker."""
        counts = None
        try:
            counts = self.counts()
        except Exception as e:  # noqa: BLE001 - an engine down, moto busy: not a finding
            note(f"{self.name}: cannot count the tasks now ({e!r})")
        for task, n in (counts or {}).items():
            if n > 1:
                self.soak.violation(f"{self.name}: {n} running copies of {task}")
        for rel in RENDERED:
            problem = parse_problem(self.root / rel)
            if problem:
                self.soak.violation(f"{self.name}: torn file: {problem}")
        for extra in self.root.rglob(".nodeagent-*"):
            # A temporary file lives only while a write is under way; one seen twice is left.
            time.sleep(0.2)
            if extra.exists():
                self.soak.violation(f"{self.name}: temporary file left: {extra}")
        code = self.agent.exited()
        if code is not None:
            self.soak.violation(f"{self.name}: nodeagent exited by itself (code {code}); "
                                f"see {self.root}/agent-{self.agent.generation}.log")
            self.agent.start()
        pid = self.agent.pid()
        if pid:
            s = proc_sample(pid)
            if s and s[0]:
                self.samples.append((now(), pid, s[0], s[1]))

    # -- the schedule

    def faults_now(self):
        """(name, weight) of the faults that may be injected now."""
        raise NotImplementedError

    def inject(self, fault):
        """Injects `fault`; returns (what was done, bound in s for the recovery once cleared)."""
        raise NotImplementedError

    def schedule(self, end):
        while not self.soak.stopping.is_set() and now() < end:
            names, weights = zip(*self.faults_now())
            fault = self.rng.choices(names, weights)[0]
            self.disrupted = None
            try:
                what, bound = self.inject(fault)
            except Exception as e:  # noqa: BLE001
                self.soak.violation(f"{self.name}: injecting {fault} failed: {e!r}")
                what, bound = fault, 60
            self.faults += 1
            with self.soak.lock:
                self.soak.faults += 1
            # The recovery counts from the disruption (a task stopped or killed, the agent
            # killed, the engine stopped or frozen) when there was one — the fault's hold
            # included —, else from the fault's end; the bound from the fault's end.
            cleared = time.monotonic()
            since = self.disrupted if self.disrupted is not None else cleared
            took = self.wait_healthy(bound)
            if took is not None:
                took += cleared - since
            if took is None:
                code, doc = self.agent.status()
                summary = (doc or {}).get("tasks")
                self.soak.violation(f"{self.name}: not healthy {bound:.0f} s after {what} "
                                    f"(status {code}, counts {self.counts()}, tasks {summary})")
                took = self.wait_healthy(120)
                if took is None:
                    self.soak.violation(f"{self.name}: never healthy again after {what}")
                    self.soak.stopping.set()
                    return
                took += bound + cleared - since
            with self.soak.lock:
                self.soak.recoveries.append((self.name, fault, took))
            note(f"{self.name}: {what}: healthy again {took:.1f} s after the disruption "
                 f"(bound {bound:.0f} s after the fault)")
            gap = self.rng.uniform(0.5, 3.0)
            if self.soak.stopping.wait(gap):
                return

    def disrupt(self):
        self.disrupted = time.monotonic()

    def fired(self):
        """How many times the world's fault rules took effect (before they are cleared)."""
        return sum(r.get("fired", 0) for r in self.world.control("GET", "/faults")["rules"])

    def sigkill_and_restart(self):
        self.disrupt()
        self.agent.sigkill()
        time.sleep(self.rng.uniform(0.0, 2.0))
        self.agent.start()


class EcsNode(Node):
    """The ECS runtime against moto; health checks off (nothing listens in the emulated ECS)."""

    name = "ecs"

    def __init__(self, soak, args, rng, work):
        super().__init__(soak, args, rng)
        self.root = work / "ecs-root"
        self.root.mkdir()
        self.world = World(soak, args.py, work, "ecs", ["--ecs-config", str(self.root / "etc/ecs/ecs.config")])
        config = self.root / "nodeagent.toml"
        config.write_text(f"""# The soak's ECS-runtime node: the test world's endpoints, a quick reconcile.
[ecs]
introspection_url = "{self.world.info['agent_url']}"
agent_timeout = "60s"
[supervision]
reconcile_interval = "2s"
backoff_initial = "500ms"
backoff_max = "5s"
# The soak's task stops are not a crash loop (that state lasts until the restarts age out of
# crash_loop_window: tests/faults.rs row 14 is about it).
crash_loop_restarts = 1000
[tasks.consul-agent.health]
http = ""
[tasks.linkerd.health]
http = ""
""")
        env = self.env()
        env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
        self.agent = Agent(soak, self, args.bin, ["--config", str(config)], env)

    def counts(self):
        return {f: len(a) for f, a in self.world.live_tasks().items()}

    def stop_a_task(self):
        live = self.world.live_tasks()
        family = self.rng.choice(sorted(live))
        self.disrupt()
        self.world.stop_task(live[family][0])
        return family

    def faults_now(self):
        faults = [("stop-task", 3), ("throttle", 2), ("lose", 2), ("lag", 1), ("slow", 1),
                  ("error", 2), ("agent-restart", 2), ("imds", 1)]
        if now() < self.args.duration - KILL_TAIL:
            faults.append(("sigkill", 1))
        return faults

    def inject(self, fault):
        w, rng = self.world, self.rng
        if fault == "stop-task":
            return f"ECS stopped {self.stop_a_task()}", 15
        if fault in ("throttle", "error", "slow"):
            hold = rng.uniform(2, 6)
            rule = {"op": "ecs:*", "fault": "throttle" if fault == "throttle" else fault}
            if fault == "slow":
                rule["delay_ms"] = rng.randint(1000, 4000)
                hold = rng.uniform(5, 10)
            w.faults([rule])
            family = self.stop_a_task()
            time.sleep(hold)
            fired = self.fired()
            w.faults([])
            # A start retried under the fault waits at most its backoff (full jitter, doubling
            # from 0.2 s: ≤ 12.8 s after ~6 s), then the reconcile and the restart backoff.
            return f"{fault} on every ECS call for {hold:.1f} s ({fired} calls) while {family} restarts", 30
        if fault == "lose":
            times = rng.randint(1, 3)
            w.faults([{"op": "ecs:StartTask", "fault": "lose", "times": times}])
            family = self.stop_a_task()
            time.sleep(rng.uniform(3, 8))
            fired = self.fired()
            w.faults([])
            return f"{fired} of at most {times} StartTask answers lost while {family} restarts", 20
        if fault == "lag":
            w.faults([{"op": "ecs:ListTasks", "fault": "lag", "lag_ms": 20000},
                      {"op": "ecs:DescribeTasks", "fault": "lag", "lag_ms": 20000}])
            family = self.stop_a_task()
            time.sleep(rng.uniform(10, 22))
            hidden = w.control("GET", "/stats")["aws"]["faults_by_operation"]
            hidden = sum(k.get("lag", 0) for k in hidden.values())
            w.faults([])
            # A task stopped less than 20 s after its start is not described yet: it counts
            # as starting (the runtime's SETTLING) until the lag is over.
            return (f"ListTasks/DescribeTasks lagging 20 s while {family} restarts "
                    f"({hidden} answers so far left a task out)"), 25
        if fault == "agent-restart":
            down = rng.randint(1000, 5000)
            w.control("POST", "/agent/restart", {"down_ms": down})
            time.sleep(rng.uniform(0, down / 1000))
            family = self.stop_a_task()
            time.sleep(down / 1000)
            return f"ECS agent down {down} ms while {family} restarts", 20
        if fault == "imds":
            return imds_fault(w, rng), 10
        if fault == "sigkill":
            self.sigkill_and_restart()
            return "SIGKILL of nodeagent, then a new one", 40
        raise ValueError(fault)


def imds_fault(world, rng):
    if rng.random() < 0.5:
        delay = rng.randint(1000, 3000)
        world.imds(delay_ms=delay)
        hold = rng.uniform(5, 12)
        time.sleep(hold)
        world.imds(delay_ms=0)
        return f"IMDS answering in {delay} ms for {hold:.1f} s"
    before = world.control("GET", "/stats")["imds"]
    world.imds(mode="expire-tokens")
    time.sleep(rng.uniform(5, 12))  # the drain trigger poller (every 5 s) meets the 401s
    after = world.control("GET", "/stats")["imds"]
    world.imds(mode="ok")
    return (f"IMDS tokens expired ({after['unauthorized'] - before['unauthorized']} answers 401, "
            f"{after['token_requests'] - before['token_requests']} new tokens asked for)")


class DockerNode(Node):
    """The docker runtime, the default task configuration, the stand-ins on a private engine."""

    name = "docker"

    def __init__(self, soak, args, rng, work):
        super().__init__(soak, args, rng)
        self.root = work / "docker-root"
        self.root.mkdir()
        self.engine_dir = args.engine_dir
        self.socket = dockerd("start", self.engine_dir)
        soak.register(self.dockerd_pid(), "dockerd")
        subprocess.run(["bash", str(HERE / "standins.sh"), "build", self.socket], check=True,
                       stdout=subprocess.DEVNULL)
        self.world = World(soak, args.py, work, "docker",
                           ["--imds-set", "local-ipv4=127.0.0.1",
                            "--ecs-config", str(self.root / "etc/ecs/ecs.config")])
        sock = self.root / "var/run/docker.sock"
        sock.parent.mkdir(parents=True)
        sock.symlink_to(self.socket.removeprefix("unix://"))
        conf = self.root / "etc/nodeagent"
        (conf / "conf.d").mkdir(parents=True)
        (conf / "nodeagent.toml").write_text(f"""# The test world's endpoints; everything else is the built-in default.
runtime = "docker"
[ecs]
introspection_url = "{self.world.info['agent_url']}"
agent_timeout = "60s"
""")
        (conf / "conf.d/50-soak.toml").write_text("""# The soak: a quicker reconcile and a lower backoff cap than the defaults; its kills are not
# a crash loop (that state lasts until the restarts age out of crash_loop_window: tests/faults.rs
# row 14 is about it).
[supervision]
reconcile_interval = "5s"
backoff_max = "5s"
crash_loop_restarts = 1000
""")
        env = self.env()
        env["DOCKER_HOST"] = self.socket
        self.agent = Agent(soak, self, args.bin, [], env)
        self.frozen = False

    def dockerd_pid(self):
        return int((Path(self.engine_dir) / "dockerd.pid").read_text().strip())

    def docker(self, *args, timeout=5):
        return subprocess.run(["docker", "-H", self.socket, *args], capture_output=True, text=True,
                              timeout=timeout)

    def containers(self):
        out = self.docker("ps", "--no-trunc", "--filter",
                          f"label=io.nodeagent.node={self.world.info['instance_id']}",
                          "--format", '{{.Label "io.nodeagent.task"}} {{.ID}}', timeout=4)
        if out.returncode != 0:
            return None
        found = {}
        for line in out.stdout.splitlines():
            task, _, cid = line.partition(" ")
            found.setdefault(task, []).append(cid)
        return found

    def counts(self):
        if self.frozen:
            return None
        try:
            found = self.containers()
        except subprocess.TimeoutExpired:
            return None
        return None if found is None else {t: len(ids) for t, ids in found.items()}

    def faults_now(self):
        faults = [("kill", 3), ("rm", 1), ("dockerd-restart", 1), ("dockerd-freeze", 2), ("imds", 1)]
        if now() < self.args.duration - KILL_TAIL:
            faults.append(("sigkill", 1))
        return faults

    def inject(self, fault):
        rng = self.rng
        if fault in ("kill", "rm"):
            found = self.containers() or {}
            task = rng.choice(sorted(found))
            args = ("kill",) if fault == "kill" else ("rm", "-f")
            self.disrupt()
            self.docker(*args, found[task][0], timeout=20)
            # The restart is immediate after a healthy run, else backed off (≤ 5 s); the health
            # check passes at its next interval (5 s); a dependency restarting does not restart
            # its dependents.
            return f"docker {' '.join(args)} {task}", 25
        if fault == "dockerd-restart":
            self.disrupt()
            dockerd("stop", self.engine_dir, kill_containers=True)
            time.sleep(rng.uniform(0, 3))
            dockerd("start", self.engine_dir)
            self.soak.register(self.dockerd_pid(), "dockerd")
            # Reconnect (≤ 5 s), reconcile, consul-agent healthy (≤ 2 checks), then its
            # dependents and theirs.
            return "dockerd restarted (every container gone)", 60
        if fault == "dockerd-freeze":
            hold = rng.uniform(3, 10)
            pid = self.dockerd_pid()
            self.frozen = True
            self.disrupt()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(hold)
            finally:
                os.kill(pid, signal.SIGCONT)
                self.frozen = False
            return f"dockerd frozen (SIGSTOP) for {hold:.1f} s", 30
        if fault == "imds":
            return imds_fault(self.world, rng), 10
        if fault == "sigkill":
            self.sigkill_and_restart()
            return "SIGKILL of nodeagent, then a new one", 40
        raise ValueError(fault)

    def thaw(self):
        try:
            os.kill(self.dockerd_pid(), signal.SIGCONT)
        except (OSError, ValueError):
            pass


def dockerd(cmd, engine_dir, kill_containers=False):
    env = dict(os.environ)
    if kill_containers:
        env["NODEAGENT_DOCKERD_KILL_CONTAINERS"] = "1"
    out = subprocess.run(["bash", str(HERE / "dockerd.sh"), cmd, str(engine_dir)], capture_output=True,
                         text=True, env=env, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"dockerd.sh {cmd} failed: {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


# ---------------------------------------------------------------- memory and fds

def flat(node, duration):
    """(first minute RSS MB, last minute RSS MB, first fds, last fds, problem or None) of the node's
    last agent: the median of its first 60 s of samples against the soak's last 60 s."""
    if not node.samples:
        return None
    last_pid = node.samples[-1][1]
    mine = [s for s in node.samples if s[1] == last_pid]
    born = mine[0][0]
    first = [s for s in mine if s[0] <= born + 60] or mine
    last = [s for s in mine if s[0] >= max(born, duration - 60)] or mine[-1:]
    rss0, rss1 = statistics.median(s[2] for s in first), statistics.median(s[2] for s in last)
    fd0, fd1 = max(s[3] for s in first), statistics.median(s[3] for s in last)
    problem = None
    if rss1 > rss0 * 1.25 + 2048:
        problem = f"{node.name}: nodeagent's RSS grew from {rss0 / 1024:.1f} MB to {rss1 / 1024:.1f} MB"
    elif fd1 > fd0 + 8:
        problem = f"{node.name}: nodeagent's open fds grew from {fd0} to {fd1:.0f}"
    return rss0 / 1024, rss1 / 1024, fd0, fd1, problem


# ---------------------------------------------------------------- main

def main():
    global T0
    p = argparse.ArgumentParser(description="the chaos soak (run tests/soak.sh)")
    p.add_argument("--duration", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--py", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--engine-dir", required=True)
    args = p.parse_args()
    work = Path(args.work)
    soak = Soak(work)
    nodes = []

    checker_stop = threading.Event()

    def on_signal(signum, _frame):
        note(f"signal {signum}: stopping")
        soak.interrupted = True
        soak.stopping.set()
        checker_stop.set()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    rng = random.Random(args.seed)
    note(f"seed {args.seed} (SOAK_SEED={args.seed} repeats this schedule), duration {args.duration} s")
    code = 1
    try:
        nodes = [EcsNode(soak, args, random.Random(rng.random()), work),
                 DockerNode(soak, args, random.Random(rng.random()), work)]
        for n in nodes:
            n.agent.start()
        for n in nodes:
            took = n.wait_healthy(120)
            if took is None:
                soak.violation(f"{n.name}: never healthy after its first boot")
                raise SystemExit(1)
            note(f"{n.name}: booted and healthy")

        def checker():
            while not checker_stop.wait(1.0):
                for n in nodes:
                    n.check()
        T0 = time.monotonic()  # the soak's clock starts with both nodes healthy
        for n in nodes:
            n.samples.clear()
        check_thread = threading.Thread(target=checker, daemon=True)
        check_thread.start()
        threads = [threading.Thread(target=n.schedule, args=(args.duration,), daemon=True) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        # Settle: both healthy, a few more looks.
        for n in nodes:
            if n.wait_healthy(60) is None:
                soak.violation(f"{n.name}: not healthy at the end")
        time.sleep(2)
        checker_stop.set()
        check_thread.join(10)
        elapsed = now()

        memory = {n.name: flat(n, elapsed) for n in nodes}
        for m in memory.values():
            if m and m[4]:
                soak.violation(m[4])
        worst = max(soak.recoveries, key=lambda r: r[2], default=("-", "-", 0.0))
        d, e = memory.get("docker"), memory.get("ecs")
        rss = f"rss {d[0]:.1f}→{d[1]:.1f} MB" if d else "rss ?"
        if e:
            rss += f" (ecs {e[0]:.1f}→{e[1]:.1f} MB)"
        fds = f"fds {d[2]}→{d[3]:.0f}" if d else ""
        if e:
            fds += f" (ecs {e[2]}→{e[3]:.0f})"
        note(f"slowest recovery: {worst[0]} {worst[1]} {worst[2]:.1f} s; per node: "
             + ", ".join(f"{n.name} {n.faults} faults" for n in nodes))
        with PRINT:
            print(f"soak: {elapsed:.0f} s, {soak.faults} faults, {len(soak.violations)} violations, "
                  f"max recovery {worst[2]:.1f} s, {rss}, {fds}, seed {args.seed}", flush=True)
        code = 1 if soak.violations else 0
    except KeyboardInterrupt:
        with PRINT:
            print(f"soak: interrupted at {now():.0f} s, {soak.faults} faults, "
                  f"{len(soak.violations)} violations so far, seed {args.seed}", flush=True)
        code = 130
    finally:
        soak.stopping.set()
        checker_stop.set()
        for n in nodes:
            if isinstance(n, DockerNode):
                n.thaw()
            n.agent.stop()
        for n in nodes:
            if isinstance(n, DockerNode):
                try:
                    dockerd("stop", n.engine_dir, kill_containers=True)
                except Exception as e:  # noqa: BLE001
                    note(f"stopping the engine: {e!r}")
            n.world.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
