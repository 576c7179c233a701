"""kubeforge on the real node of ../shared/realk8s (node-up.sh: kubelet, containerd + runc, CNI bridge,
pod DNS): its own images, built from the Dockerfile and loaded into containerd, the chart installed
with its kind values, the operator running as the chart's Deployment. `pytest --cluster=node` runs
the tests under tests/node/ there.

What this machine lacks against a kind cluster, and what stands in for it (nothing else differs):
- no registry: the images are built here (hack/build-images.sh --local) and loaded with load-image.sh,
  which is what `kind load` does; the kind values already say `pullPolicy: Never`;
- no MinIO image: moto's S3 server on the node's address, where pods reach it;
- no kube-proxy (Service IPs lead nowhere) and an API server on loopback with no ServiceAccount
  admission plugin: a forwarder on the node's address to the API server, and the operator pod gets
  the token volume and `kubernetes.default.svc` address that the plugin and kube-proxy give a pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import yaml

from support.chart import crds, only, rendered
from support.jobs import EXAMPLES, ROOT
from support.processes import moto_server

NODE_IP = os.environ.get("REALK8S_POD_CIDR", "10.244.0.0/24").rsplit(".", 1)[0] + ".1"
NODE_NAME = os.environ.get("REALK8S_NODE", "realk8s-node")
API_PORT = int(os.environ.get("REALK8S_PORT", "6443"))
RELEASE, RELEASE_NAMESPACE = "kubeforge", "kubeforge-system"
KIND_VALUES = ROOT / "charts" / "kubeforge" / "ci" / "kind-cpu-values.yaml"
IMAGES = {"operator": "kubeforge-operator:dev", "trainer-cpu": "kubeforge-trainer-cpu:dev"}
#: What pods need of this machine: the node's packages, and Docker with debootstrap for the images.
NEEDED = {"containerd": "containerd", "runc": "runc", "ctr": "containerd", "dnsmasq": "dnsmasq-base",
          "docker": "docker.io", "dockerd": "docker.io", "debootstrap": "debootstrap"}
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The S3 credentials every test namespace gets, as the kind path creates them.
SECRET = yaml.safe_load((EXAMPLES / "kubectl" / "s3-secret.yaml").read_text())


def realk8s_home() -> Path:
    return Path(os.environ.get("REALK8S_HOME") or Path.home() / ".cache" / "kubeforge-realk8s")


def missing_tools() -> list[str]:
    """The Debian packages to install for the node and the image build, by what is not on PATH."""
    missing = {package for tool, package in NEEDED.items() if shutil.which(tool) is None}
    if not Path("/usr/lib/cni/bridge").exists():
        missing.add("containernetworking-plugins")
    return sorted(missing)


class Forwarder(socketserver.ThreadingTCPServer):
    """TCP from (host, port) to target, a thread per direction: the pods' way to the API server."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        super().__init__(listen, _Pump)


class _Pump(socketserver.BaseRequestHandler):
    server: Forwarder

    def handle(self) -> None:
        with contextlib.suppress(OSError), socket.create_connection(self.server.target, timeout=10) as upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
            back.start()
            _copy(self.request, upstream)
            back.join()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def forwarding(listen: tuple[str, int], target: tuple[str, int]) -> Iterator[Forwarder]:
    server = Forwarder(listen, target)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass
class Node:
    """The running node, with kubeforge installed: what the tests reach it by."""

    kubeconfig: str
    s3_endpoint: str  # on the node's address: the same URL for pods and for the tests
    kubectl_path: Path
    containerd_socket: Path
    build_seconds: float

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.kubectl_path), "--kubeconfig", self.kubeconfig, *args], input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def container_pid(self, container_id: str) -> int:
        """The host PID of a container's first process (containerStatuses[].containerID)."""
        listing = subprocess.run(["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", "tasks", "ls"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        wanted = container_id.removeprefix("containerd://")
        for line in listing.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == wanted:
                return int(pid)
        raise AssertionError(f"no running task {wanted} in containerd:\n{listing}")

    def operator_log(self) -> str:
        return self.kubectl("-n", RELEASE_NAMESPACE, "logs", f"deployment/{RELEASE}", "--tail", "200",
                            check=False, timeout=30).stdout


def s3_client(node: Node) -> Any:
    """The node's S3 (moto), with the Secret's own keys."""
    keys = SECRET["stringData"]
    return boto3.client("s3", endpoint_url=node.s3_endpoint, aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"], region_name=keys["AWS_DEFAULT_REGION"])


def chart_objects(s3_endpoint: str) -> list[dict[str, Any]]:
    """The chart rendered with its kind values, S3 at s3_endpoint (the one override: MinIO's image
    cannot be pulled here), and the operator pod given what the ServiceAccount admission plugin and
    kube-proxy give a pod on a full cluster: a token volume and a route to the API server."""
    values = yaml.safe_load(KIND_VALUES.read_text())
    values["s3"]["endpoint"] = s3_endpoint
    objects = rendered(values, release=RELEASE, namespace=RELEASE_NAMESPACE)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    pod["hostAliases"] = [{"ip": NODE_IP, "hostnames": ["kubernetes.default.svc"]}]
    pod.setdefault("volumes", []).append({"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}})
    container = pod["containers"][0]
    container.setdefault("volumeMounts", []).append({"name": "kube-api-access", "mountPath": TOKEN_DIR,
                                                     "readOnly": True})
    container["env"] += [{"name": "KUBERNETES_SERVICE_HOST", "value": "kubernetes.default.svc"},
                         {"name": "KUBERNETES_SERVICE_PORT", "value": str(API_PORT)}]
    return objects


def build_images(save_dir: Path) -> float:
    """hack/build-images.sh --local, each image saved to save_dir/<target>.tar: seconds taken."""
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "hack" / "build-images.sh"), "--local"], cwd=ROOT, capture_output=True,
                           text=True, timeout=3000, env={**os.environ, "SAVE_DIR": str(save_dir)})
    if build.returncode != 0:
        raise RuntimeError(f"hack/build-images.sh --local failed ({build.returncode}):\n"
                           f"{build.stdout[-6000:]}{build.stderr[-6000:]}")
    return time.monotonic() - started


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """dockerd, started for the block when none answers. Without iptables or a bridge: its FORWARD
    DROP policy would cut the pods' bridge, and the builds use the host's network anyway."""
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        yield
        return
    log = ROOT / "build" / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        process = subprocess.Popen(["dockerd", "--iptables=false", "--bridge=none"], stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)


@contextlib.contextmanager
def kubeforge_on_node(kubeconfig: str, realk8s: Path) -> Iterator[Node]:
    """The node up (node-up.sh, on the control plane of kubeconfig), kubeforge's images built and
    loaded, S3 and the API server reachable from pods, the chart installed and its operator Ready."""
    save_dir = ROOT / "build" / "images"
    with docker_engine():
        build_seconds = build_images(save_dir)
    up = subprocess.run([str(realk8s / "node-up.sh")], capture_output=True, text=True, timeout=180)
    if up.returncode != 0:
        raise RuntimeError(f"node-up.sh failed ({up.returncode}):\n{up.stdout}{up.stderr}")
    try:
        for target in IMAGES:
            subprocess.run([str(realk8s / "load-image.sh"), str(save_dir / f"{target}.tar")], check=True,
                           capture_output=True, timeout=900)
        with forwarding((NODE_IP, API_PORT), ("127.0.0.1", API_PORT)), moto_server(host=NODE_IP) as s3:
            node = Node(kubeconfig, s3, realk8s_home() / "bin" / "kubectl", Path(up.stdout.strip().splitlines()[-1]),
                        build_seconds)
            install_chart(node)
            try:
                yield node
            finally:  # `helm uninstall`: a control plane that outlives the session keeps no operator
                node.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait", "--timeout=120s", check=False,
                             input=yaml.safe_dump_all(chart_objects(node.s3_endpoint)), timeout=150)
    finally:
        subprocess.run([str(realk8s / "node-down.sh")], capture_output=True, timeout=180, check=False)


def install_chart(node: Node) -> None:
    """What `helm install --values kind-cpu-values.yaml` does: the CRDs first, then the templates."""
    node.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds()))
    node.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    node.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}}))
    node.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(chart_objects(node.s3_endpoint)))
    rollout = node.kubectl("-n", RELEASE_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}", "--timeout=180s",
                           check=False, timeout=200)
    if rollout.returncode != 0:
        pods = node.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-o", "json", check=False).stdout
        raise RuntimeError(f"the operator did not become Ready: {rollout.stderr}\n{node.operator_log()}\n"
                           f"{json.dumps([p.get('status') for p in json.loads(pods or '{}').get('items', [])])}")


def kubectl_example(node: Node, namespace: str, path: Path = EXAMPLES / "pipeline.yaml") -> str:
    """`kubectl apply -f` of an example, in namespace, as a user runs it."""
    return node.kubectl("-n", namespace, "apply", "-f", str(path)).stdout
