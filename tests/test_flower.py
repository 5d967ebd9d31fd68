"""The Flower app (flower_app.py, flower_run.py): a real loopback deployment, with TLS and SuperNode
authentication, trains the adapters train.py trains, bit for bit, and so does one whose SuperNode is
killed in the middle of a round and restarted; a node whose key is not registered, or that does not
trust the deployment's CA, is refused; a node that stops answering costs a round its reply and
nothing else; what crosses the wire is the global adapter and numbers, never a local adapter; a
failed ServerApp or an unreachable SuperLink fails the command with one line; no process is left
behind."""
import glob
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from extras import flower_app, flower_run
import train
from conftest import ROOT

SMALL = ["--clients", "3", "--local-steps", "2", "--pretrain-steps", "20", "--test-per-task", "2",
         "--max-new-tokens", "4", "-q"]  # LoRA dropout on: each client's draws are its own generator's, kept on disk


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The built-in base, pretrained once for this module."""
    d = tmp_path_factory.mktemp("cache")
    cfg, _ = train.parse_args([*SMALL, "--cache", str(d)])
    train.base_and_tokenizer(cfg, torch.device("cpu"), False)
    return str(d)


ARGS = [*SMALL, "--methods", "feddpa-t,feddpa-t-calibrated", "--rounds", "3"]  # the deployments' run


def train_py(tmp_path_factory, cache: str, clients: int) -> Path:
    """`python train.py` with the deployments' settings, on as many threads as each of their nodes: what
    they must end with."""
    out = tmp_path_factory.mktemp("ours") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(flower_run.threads_per_node(clients))
    try:
        train.main([*ARGS, "--clients", str(clients), "--cache", cache, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory, cache):
    return train_py(tmp_path_factory, cache, 3)


@pytest.fixture(scope="module")
def ours2(tmp_path_factory, cache):
    return train_py(tmp_path_factory, cache, 2)


def processes_using(folder: str) -> list:
    """Pids of live processes whose command line or environment names folder (FLWR_HOME lives there)."""
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if folder.encode() in (p / "cmdline").read_bytes() + (p / "environ").read_bytes():
                if (p / "stat").read_text().split(") ")[-1][0] != "Z":  # zombies hold nothing
                    found.append(int(p.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def client_apps(node_pid: int) -> set:
    """The ClientApp processes a SuperNode is running now (it starts one per message)."""
    found = set()
    for pid in flower_run.descendants(node_pid):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def local_state(work: Path, client: int, phase: str, round_: int) -> dict:
    (path,) = glob.glob(str(work / f"state{client}" / "run-*" / phase / f"round{round_}.pt"))
    return torch.load(path, weights_only=True)["local"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# A real deployment on loopback: processes, ports, flwr run

def same_run(flower: Path, work: Path, ours: Path, nodes: int = 3):
    """The deployment in `work` ended with train.py's adapters and scores, bit for bit; no local adapter
    ever reached its server."""
    assert same(load_file(flower / "adapters" / "feddpa-t" / "global.safetensors"),
                load_file(ours / "adapters" / "feddpa-t" / "global.safetensors"))
    for i in range(nodes):  # each local adapter stayed on its node, where it is bit-identical to train.py's
        assert same(local_state(work, i, "feddpa-t", 2), load_file(ours / "adapters" / "feddpa-t" / f"client{i}_local.safetensors"))
    assert not list((flower / "adapters").rglob("*local*"))
    theirs, mine = (json.loads((d / "results.json").read_text()) for d in (flower, ours))
    for m in ("feddpa-t", "feddpa-t-calibrated"):  # scored on the nodes: the same answers
        assert theirs["methods"][m]["per_client"] == mine["methods"][m]["per_client"]
        assert theirs["methods"][m]["lambda"] == mine["methods"][m]["lambda"]
    return theirs


@pytest.mark.slow
def test_a_loopback_deployment_trains_what_train_py_trains(tmp_path, cache, ours):
    """The default deployment: TLS by a CA of its own and SuperNode authentication, three nodes."""
    work = tmp_path / "work"
    assert flower_run.main(["--nodes", "3", "--work", str(work), *ARGS, "--cache", cache,
                            "--out", str(tmp_path / "flower")]) == 0
    assert processes_using(str(work)) == []
    superlink = (work / "superlink.log").read_text()
    assert "running on https://127.0.0.1:" in superlink and "SuperNode authentication is disabled" not in superlink
    assert sorted(p.name for p in (work / "keys").iterdir()) == ["node0", "node0.pub", "node1", "node1.pub", "node2",
                                                                 "node2.pub"]
    same_run(tmp_path / "flower", work, ours)


def refused(d: flower_run.Deployment, name: str, timeout: float = 120.0) -> str:
    """The log of node `name`, once it has exited refused; fails the test at once if it got a node id."""
    log, t0 = Path(d.work) / f"{name}.log", time.time()
    while d.procs[name].poll() is None:
        assert "SuperNode ID:" not in log.read_text(errors="replace"), f"{name} was let in: {log.read_text()}"
        assert time.time() - t0 < timeout, f"{name} neither got in nor gave up: {log.read_text()}"
        time.sleep(0.2)
    assert d.procs[name].returncode != 0 and "SuperNode ID:" not in log.read_text(errors="replace")
    return log.read_text(errors="replace")


def start_stranger(d: flower_run.Deployment, name: str, security: list, i: int = 0):
    """A SuperNode that claims client i's place with the given TLS and key flags."""
    d.start(name, ["flower-supernode", *security, "--superlink", d.superlink, "--port", str(flower_run.free_port()),
                   "--node-config", f'partition-id={i} state-dir="{Path(d.work) / name}"'])


@pytest.mark.slow
def test_a_node_whose_key_is_not_registered_is_refused(tmp_path, cache, ours2):
    """Beside the two registered nodes, a node with a key the SuperLink never registered and one with no
    key at all (without authentication it would register itself), both trusting the CA and claiming
    client 0's place: each is refused, and the run ends with the registered nodes' adapters."""
    work = tmp_path / "work"
    d = flower_run.Deployment(str(work), 2)
    try:
        d.start_superlink()
        for i in range(2):
            d.start_node(i, str(work / f"state{i}"))
        flower_run.write_node_key(str(work / "keys" / "unregistered"))
        start_stranger(d, "unregistered", ["--root-certificates", d.ca, "--auth-supernode-private-key",
                                           str(work / "keys" / "unregistered")])
        start_stranger(d, "keyless", ["--root-certificates", d.ca])
        assert "[code: 2004] Failed to activate SuperNode" in refused(d, "unregistered")
        assert "All SuperNodes must be registered via the CLI" in refused(d, "keyless")
        d.run_app([*ARGS, "--clients", "2", "--cache", cache, "--out", str(tmp_path / "flower")], 2,
                  round_timeout=120, connect_timeout=60, out=io.StringIO())
    finally:
        d.close()
    assert processes_using(str(work)) == []
    same_run(tmp_path / "flower", work, ours2, nodes=2)


def test_a_node_that_does_not_trust_the_ca_cannot_connect(tmp_path):
    """Nodes with registered keys but the wrong root certificates, another CA's or none (the system's):
    the TLS handshake fails and they give up, one line in their log saying so. (A key registered twice
    is refused in one line.)"""
    work = tmp_path / "work"
    d = flower_run.Deployment(str(work), 2)
    try:
        d.start_superlink()
        other = flower_run.write_certificates(str(tmp_path / "other-ca"))
        for name, roots in (("other-ca", ["--root-certificates", other["ca"]]), ("no-ca", [])):
            key = str(work / "keys" / name)
            d.register(flower_run.write_node_key(key))
            start_stranger(d, name, [*roots, "--auth-supernode-private-key", key])
        with pytest.raises(flower_run.DeployError) as e:
            d.register(key + ".pub")
        assert str(e.value) == f"the SuperLink did not register {key}.pub: [code: 23] Public key already in use."
        for name in ("other-ca", "no-ca"):
            assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in refused(d, name)
    finally:
        d.close()
    assert processes_using(str(work)) == []


def handshake(certs: dict, host: str, ca: str):
    """A TLS handshake with a server holding certs' certificate, by a client that trusts only ca, checks
    `host` against it and verifies strictly (as Python 3.13 does by default); raises if it fails."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["cert"], certs["key"])
    client = ssl.create_default_context(cafile=ca)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    a, b = socket.socketpair()

    def accept():
        try:
            server.wrap_socket(a, server_side=True).close()
        except (ssl.SSLError, OSError):  # the client refused the certificate: its side raises
            pass
    with a, b:
        serving = threading.Thread(target=accept, daemon=True)
        serving.start()
        try:
            client.wrap_socket(b, server_hostname=host).close()
        finally:
            a.close()
            serving.join(10)


def test_the_certificates_name_the_loopback_and_the_node_keys_are_flower_s(tmp_path):
    """The SuperLink's certificate verifies against the CA, strictly, for 127.0.0.1 and localhost and for
    no other name, and not against another CA; keys are readable by their owner only; a node key is the
    OpenSSH P-384 pair that flower-supernode and `flwr supernode register` read."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    certs = flower_run.write_certificates(str(tmp_path / "certs"))
    other = flower_run.write_certificates(str(tmp_path / "other"))
    for host in ("127.0.0.1", "localhost"):
        handshake(certs, host, certs["ca"])
    for host, ca in (("127.0.0.2", certs["ca"]), ("example.org", certs["ca"]), ("127.0.0.1", other["ca"])):
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(certs, host, ca)
    public = flower_run.write_node_key(str(tmp_path / "keys" / "node0"))
    key = load_ssh_private_key((tmp_path / "keys" / "node0").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(Path(public).read_bytes()).public_numbers() == key.public_key().public_numbers()
    for private in (certs["key"], tmp_path / "keys" / "node0"):
        assert os.stat(private).st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_a_node_killed_mid_round_and_restarted_loses_nothing(tmp_path, cache, ours2):
    """SIGKILL to node 1's SuperNode and ClientApp while it trains round 3, then a restart on the same
    state folder: the server sends round 3 to the node's new id, the node trains it from its files of
    round 2, and the run ends exactly as an uninterrupted one. (Two nodes: one per core here, so that
    the deployment's time is the messages' and not the cores'.) Without node authentication: with it,
    a node's id is its registered key's, and a node restarted at once is refused until the SuperLink
    counts it offline (docs/flower.md)."""
    work = tmp_path / "work"
    d = flower_run.Deployment(str(work), 2, insecure=True)
    out, failure = [], []
    try:
        d.start_superlink()
        for i in range(2):
            d.start_node(i, str(work / f"state{i}"))

        class Lines:
            def write(self, s):
                out.append(s)

            def flush(self):
                pass

        def run():
            try:
                d.run_app([*ARGS, "--clients", "2", "--cache", cache, "--out", str(tmp_path / "flower")], 2,
                          round_timeout=120, connect_timeout=60, out=Lines())
            except Exception as e:  # noqa: BLE001 - handed to the test's thread
                failure.append(e)
        app = threading.Thread(target=run)
        app.start()
        log, state = work / "node1.log", work / "state1"
        t0 = time.time()
        while not list(state.glob("run-*/feddpa-t/round1.pt")):  # node 1 has trained round 2 ...
            assert time.time() - t0 < 300 and app.is_alive(), "".join(out)
            time.sleep(0.05)
        before = client_apps(d.procs["node1"].pid)
        while not client_apps(d.procs["node1"].pid) - before:   # ... and a new ClientApp process takes round 3
            assert time.time() - t0 < 300 and app.is_alive(), "".join(out)
            time.sleep(0.05)
        d.stop("node1", kill=True)                              # killed (SIGKILL) while it trains
        assert not list(state.glob("run-*/feddpa-t/round2.pt"))
        killed_log = log.stat().st_size
        d.start_node(1, str(state))                             # restarted: the same state folder
        app.join(300)
        assert not app.is_alive() and not failure, "".join(out) + str(failure)
    finally:
        d.close()
    assert processes_using(str(work)) == []
    assert "feddpa-t round 3: client 1 is back under a new node id; sending it the message again" in "".join(out)
    restarted = log.read_bytes()[killed_log:].decode(errors="replace")
    assert "client 1: feddpa-t round 3, local adapter from round 2 on disk" in restarted  # it went on from disk
    history = same_run(tmp_path / "flower", work, ours2, nodes=2)["training"]["feddpa-t"]["history"]
    assert [h["clients"] for h in history] == [[0, 1]] * 3 and [h["missing"] for h in history] == [[]] * 3


def test_a_failed_server_app_fails_the_command_with_its_error(tmp_path, cache, capfd):
    """(--insecure: the loopback deployment without TLS still starts and stops as the secure one.)"""
    code = flower_run.main(["--nodes", "1", "--insecure", "--work", str(tmp_path / "work"), *SMALL, "--cache", cache,
                            "--methods", "centralized", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: the run ended finished:failed") and "run the base model, Local and Centralized" in err[-1]
    assert processes_using(str(tmp_path / "work")) == []


def test_an_unreachable_superlink_is_one_line(tmp_path):
    port = flower_run.free_port()
    r = subprocess.run([sys.executable, "-m", "extras.flower_run", "--superlink", f"127.0.0.1:{port}", "--insecure",
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: no SuperLink reachable at 127.0.0.1:{port}") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("flags, why", [
    (["--root-certificates", "ca.crt"],
     "--root-certificates: only with --superlink (the loopback deployment makes its own CA)"),
    (["--superlink", "127.0.0.1:1", "--root-certificates", "no/ca.crt"], "--root-certificates no/ca.crt: no such file")])
def test_bad_root_certificates_are_one_line(tmp_path, capsys, flags, why):
    assert flower_run.main([*flags, "--work", str(tmp_path / "work")]) == 2
    assert capsys.readouterr().err == f"error: {why}\n"
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------------------------
# The messages themselves: the app's server and nodes in this process, every message kept

class InProcessGrid:
    """flwr's Grid as the server uses it, with the nodes in this process: a node answers a message when
    the server looks for the reply, and every message, both ways, is kept. A node in `dead` takes
    messages and never answers, as a killed SuperNode; on_push(message), if set, sees each message as
    it is pushed (to kill or restart a node then)."""

    def __init__(self, node_configs: list):
        self.nodes = {1000 + i: c for i, c in enumerate(node_configs)}
        self.wire, self.waiting, self.dead, self.on_push = [], {}, set(), None

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.dead]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.wire)}"
            m.metadata.__dict__["_message_id"] = mid  # as the SuperLink names a message it takes
            if self.on_push:
                self.on_push(m)
            self.wire.append(m)
            self.waiting[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            node = self.waiting[mid].metadata.dst_node_id if mid in self.waiting else None
            if node is not None and node not in self.dead:
                replies.append(flower_app.client(self.waiting.pop(mid), Context(1, node, self.nodes[node], RecordDict(), {})))
                self.wire.append(replies[-1])
        return replies

    def restart(self, node: int):
        """The node's client, back under a new node id (the same node config: the same state folder)."""
        self.dead.add(node)
        self.nodes[max(self.nodes) + 1] = self.nodes[node]


def server_context(args: list, out: Path, round_timeout: float) -> Context:
    return Context(1, 0, {}, RecordDict(), {"train-args": " ".join([*args, "--out", str(out)]), "nodes": 3,
                                            "round-timeout": round_timeout, "connect-timeout": 10.0})


@pytest.fixture
def serverapp_process(monkeypatch):
    """What a ServerApp process is told at its start."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


def test_a_node_that_stops_answering_costs_only_its_replies(tmp_path, cache, serverapp_process, capsys):
    """Node 2 dies as round 3 goes out: round 3 waits out its timeout and averages the two replies that
    came (the history lists client 2 as missing); the node, restarted under a new id as round 4 goes
    out, is sent round 4 again there and trains it from its files of round 2."""
    args = [*SMALL, "--methods", "feddpa-t", "--rounds", "4", "--cache", cache]
    grid = InProcessGrid([{"partition-id": i, "state-dir": str(tmp_path / "work" / f"state{i}")} for i in range(3)])

    def on_push(m):
        if m.metadata.message_type == "train" and m.metadata.dst_node_id == 1002:
            if int(m.content["run"]["round"]) == 2:
                grid.dead.add(1002)   # killed as it receives round 3
            elif int(m.content["run"]["round"]) == 3:
                grid.restart(1002)    # back while round 4's message to its old id waits
    grid.on_push = on_push
    flower_app.server(grid, server_context(args, tmp_path / "flower", round_timeout=5.0))
    history = json.loads((tmp_path / "flower" / "results.json").read_text())["training"]["feddpa-t"]["history"]
    assert [h["missing"] for h in history] == [[], [], [2], []]
    assert [h["clients"] for h in history] == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1, 2]]
    trains = [m for m in grid.wire if m.metadata.message_type == "train"]
    sent = {(int(m.content["run"]["round"]), m.metadata.dst_node_id): m for m in trains if m.metadata.reply_to_message_id == ""}
    assert sorted(sent) == [(0, 1000), (0, 1001), (0, 1002), (1, 1000), (1, 1001), (1, 1002), (2, 1000), (2, 1001),
                            (2, 1002), (3, 1000), (3, 1001), (3, 1002), (3, 1003)]
    got = {m.metadata.reply_to_message_id: m for m in trains if m.metadata.reply_to_message_id}
    replies = [got[sent[(2, n)].metadata.message_id] for n in (1000, 1001)]
    assert sent[(2, 1002)].metadata.message_id not in got
    n = [r.content["metrics"]["n-examples"] for r in replies]
    ups = [r.content["global"].to_torch_state_dict() for r in replies]
    down = sent[(3, 1000)].content["global"].to_torch_state_dict()  # what round 3 averaged: the two replies only
    for k in down:
        want = (n[0] * ups[0][k].double() + n[1] * ups[1][k].double()) / (n[0] + n[1])
        assert torch.allclose(down[k].double(), want, rtol=0, atol=1e-7), k
    assert sent[(3, 1003)].metadata.message_id in got                   # round 4, sent again to the new id, came back
    assert "client 2: feddpa-t round 4, local adapter from round 2 on disk" in capsys.readouterr().out
    assert list((tmp_path / "work" / "state2").glob("run-*/feddpa-t/round3.pt"))
    assert not list((tmp_path / "work" / "state2").glob("run-*/feddpa-t/round2.pt"))


def test_only_the_global_adapter_and_numbers_cross_the_wire(tmp_path, cache, serverapp_process):
    args = [*SMALL, "--methods", "fedit,feddpa-f,feddpa-t,feddpa-t-calibrated", "--rounds", "2", "--cache", cache]
    grid = InProcessGrid([{"partition-id": i, "state-dir": str(tmp_path / "work" / f"state{i}")} for i in range(3)])
    flower_app.server(grid, server_context(args, tmp_path / "flower", round_timeout=60.0))
    train.main([*args, "--out", str(tmp_path / "ours")])
    ours = tmp_path / "ours" / "adapters"
    global_names = set(load_file(ours / "fedit" / "global.safetensors"))
    locals_ = [local_state(tmp_path / "work", i, p, r) for i in range(3) for p, r in (("feddpa-f", 0), ("feddpa-t", 1))]
    for p, r in (("feddpa-f", 0), ("feddpa-t", 1)):  # the nodes trained what train.py trains, every phase
        for i in range(3):
            assert same(local_state(tmp_path / "work", i, p, r), load_file(ours / p / f"client{i}_local.safetensors"))
    for p in ("fedit", "feddpa-t"):
        assert same(load_file(tmp_path / "flower" / "adapters" / p / "global.safetensors"),
                    load_file(ours / p / "global.safetensors"))
    kinds = set()
    for m in grid.wire:
        kinds.add(m.metadata.message_type)
        content = m.content
        for name, record in content.array_records.items():  # tensors: a global adapter, whole, nothing else
            assert name == "global" or name.startswith("global."), name
            tensors = record.to_torch_state_dict()
            assert set(tensors) == global_names
            for local in locals_:
                assert not any(torch.equal(t, local[k]) for k, t in tensors.items())
        for record in [*content.config_records.values(), *content.metric_records.values()]:
            for value in record.values():  # numbers, settings and scores: nothing shaped like a tensor
                assert isinstance(value, (str, int, float, bool)) or (isinstance(value, list) and len(value) < 1000)
    assert kinds == {"query", "train", "evaluate"}


def test_dp_over_flower_clips_on_the_nodes_and_adds_the_noise_at_the_server(tmp_path, cache, serverapp_process):
    """--dp-clip over Flower (server and nodes in one process): every update that leaves a node is already
    clipped to norm C, the history keeps the nodes' norms before clipping, and with seeded noise
    (dp-seeded-noise) the global adapters are train.py's within rounding (the node's clip, cast to
    float32, then the server's); without it the noise is secure randomness and the global adapter differs."""
    clip = 0.05
    args = [*SMALL, "--methods", "fedit", "--rounds", "1", "--cache", cache, "--dp-clip", str(clip), "--dp-noise", "0.5"]
    runs_ = {}
    for name, seeded in (("seeded", True), ("secure", False)):
        grid = InProcessGrid([{"partition-id": i, "state-dir": str(tmp_path / name / f"state{i}")} for i in range(3)])
        context = server_context(args, tmp_path / name / "flower", round_timeout=60.0)
        context.run_config["dp-seeded-noise"] = seeded
        flower_app.server(grid, context)
        runs_[name] = grid
    train.main([*args, "--out", str(tmp_path / "ours")])
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["training"]["fedit"]
    theirs = json.loads((tmp_path / "seeded" / "flower" / "results.json").read_text())["training"]["fedit"]
    assert theirs["epsilon"] == ours["epsilon"] > 0
    for a, b in zip(theirs["history"], ours["history"]):
        assert a["update_norms"] == pytest.approx(b["update_norms"], rel=1e-5)
    assert max(n for h in ours["history"] for n in h["update_norms"]) > clip  # the clip bites
    got = load_file(tmp_path / "seeded" / "flower" / "adapters" / "fedit" / "global.safetensors")
    want = load_file(tmp_path / "ours" / "adapters" / "fedit" / "global.safetensors")
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)
    secure = load_file(tmp_path / "secure" / "flower" / "adapters" / "fedit" / "global.safetensors")
    assert not all(torch.allclose(secure[k], want[k], atol=1e-3) for k in want)
    down = {}
    for m in runs_["seeded"].wire:  # each node's update against the adapter it was sent that round
        if m.metadata.message_type != "train" or "global" not in m.content.array_records:
            continue
        if "run" in m.content.config_records:  # the server's message
            down[m.metadata.message_id] = m.content.array_records["global"].to_torch_state_dict()
        else:
            sent = down[m.metadata.reply_to_message_id]
            up = m.content.array_records["global"].to_torch_state_dict()
            norm = sum(float(((up[k].double() - sent[k].double()) ** 2).sum()) for k in sent) ** 0.5
            assert norm <= clip * (1 + 1e-5)


def test_flwr_is_found_beside_the_interpreter_or_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A virtual environment that is not activated still has flwr's executables beside its python; where
    they are nowhere, one line names the one missing and nothing starts."""
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: only BIN can provide them
    assert flower_run.missing_executable() == ""
    assert flower_run.Deployment(str(tmp_path / "w"), 1).env("x")["PATH"].split(os.pathsep)[0] == flower_run.BIN
    monkeypatch.setattr(flower_run, "BIN", str(tmp_path / "nothing"))
    assert flower_run.main(["--nodes", "1", "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flwr's 'flwr' is neither beside" in err and "pip install flwr" in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("flag, why", [("--eval-every 1", "a node keeps only its last local adapter"),
                                       ("--rescore runs/x", "its local adapters are on the nodes"),
                                       ("--tasks entailment", "a node is the client at its place in the data")])
def test_what_a_flower_run_cannot_do_is_refused_in_one_line(flag, why):
    from runs import UserError
    with pytest.raises(UserError) as e:
        flower_app.settings(f"--methods fedit {flag}")
    assert str(e.value) == f"{flag.split()[0]}: not over Flower ({why}); use train.py"
