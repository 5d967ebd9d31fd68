"""The Flower app (flower_app.py, flower_run.py): a real loopback deployment trains the adapters
train.py trains, bit for bit; a SuperNode killed in the middle of a round costs that round its reply
and nothing else; what crosses the wire is the global adapter and numbers, never a local adapter; a
failed ServerApp or an unreachable SuperLink fails the command with one line; no process is left behind."""
import glob
import json
import os
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

import flower_app
import flower_run
import train
from conftest import ROOT

SMALL = ["--clients", "3", "--local-steps", "2", "--pretrain-steps", "20", "--test-per-task", "2",
         "--max-new-tokens", "4", "--lora-dropout", "0", "-q"]  # dropout 0: its noise is drawn per process


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The built-in base, pretrained once for this module."""
    d = tmp_path_factory.mktemp("cache")
    cfg, _ = train.parse_args([*SMALL, "--cache", str(d)])
    train.base_and_tokenizer(cfg, torch.device("cpu"), False)
    return str(d)


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

def test_a_loopback_deployment_trains_what_train_py_trains(tmp_path, cache):
    args = [*SMALL, "--methods", "feddpa-t,feddpa-t-calibrated", "--rounds", "3", "--cache", cache]
    t0 = time.time()
    assert flower_run.main(["--nodes", "3", "--work", str(tmp_path / "work"), *args, "--out", str(tmp_path / "flower")]) == 0
    seconds = time.time() - t0
    assert processes_using(str(tmp_path / "work")) == []
    train.main([*args, "--out", str(tmp_path / "ours")])
    ours = tmp_path / "ours" / "adapters" / "feddpa-t"
    assert same(load_file(tmp_path / "flower" / "adapters" / "feddpa-t" / "global.safetensors"),
                load_file(ours / "global.safetensors"))
    for i in range(3):  # each local adapter stayed on its node, where it is bit-identical to train.py's
        assert same(local_state(tmp_path / "work", i, "feddpa-t", 2), load_file(ours / f"client{i}_local.safetensors"))
    assert not list((tmp_path / "flower" / "adapters").rglob("*local*"))  # the server never had one
    theirs, mine = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("flower", "ours"))
    for m in ("feddpa-t", "feddpa-t-calibrated"):  # scored on the nodes: the same answers
        assert theirs["methods"][m]["per_client"] == mine["methods"][m]["per_client"]
        assert theirs["methods"][m]["lambda"] == mine["methods"][m]["lambda"]
    print(f"loopback deployment, 3 nodes, 3 rounds: {seconds:.0f}s")


def test_a_node_killed_mid_round_costs_only_its_reply(tmp_path, cache):
    work = tmp_path / "work"
    d = flower_run.Deployment(str(work))
    out, failure = [], []
    try:
        d.start_superlink()
        for i in range(3):
            d.start_node(i, str(work / f"state{i}"))
        args = [*SMALL, "--methods", "feddpa-t", "--rounds", "4", "--cache", cache,
                "--out", str(tmp_path / "flower")]

        class Lines:
            def write(self, s):
                out.append(s)

            def flush(self):
                pass

        def run():
            try:
                d.run_app(args, 3, round_timeout=20, connect_timeout=60, out=Lines())
            except Exception as e:  # noqa: BLE001 - handed to the test's thread
                failure.append(e)
        app = threading.Thread(target=run)
        app.start()
        log, done = work / "node2.log", work / "state2"
        t0 = time.time()
        while not list(done.glob("run-*/feddpa-t/round1.pt")):  # node 2 has trained round 2 ...
            assert time.time() - t0 < 300 and app.is_alive(), "".join(out)
            time.sleep(0.05)
        before = client_apps(d.procs["node2"].pid)
        while not client_apps(d.procs["node2"].pid) - before:   # ... and a new ClientApp process takes round 3
            assert time.time() - t0 < 300 and app.is_alive(), "".join(out)
            time.sleep(0.05)
        d.stop("node2", kill=True)                              # killed (SIGKILL) while it trains
        d.start_node(2, str(work / "state2"))                   # restarted: the same state folder
        app.join(300)
        assert not app.is_alive() and not failure, "".join(out) + str(failure)
    finally:
        d.close()
    assert processes_using(str(work)) == []
    history = json.loads((tmp_path / "flower" / "results.json").read_text())["training"]["feddpa-t"]["history"]
    assert [h["missing"] for h in history] == [[], [], [2], []]     # round 3 went on without it ...
    assert [h["clients"] for h in history] == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1, 2]]
    assert not glob.glob(str(work / "state2" / "run-*" / "feddpa-t" / "round2.pt"))  # ... it saved nothing of it
    restarted = log.read_text(errors="replace")
    assert "client 2: feddpa-t round 4, local adapter from round 2 on disk" in restarted  # ... and went on from disk


def test_a_failed_server_app_fails_the_command_with_its_error(tmp_path, cache, capfd):
    code = flower_run.main(["--nodes", "1", "--work", str(tmp_path / "work"), *SMALL, "--cache", cache,
                            "--methods", "centralized", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: the run ended finished:failed") and "run the base model, Local and Centralized" in err[-1]
    assert processes_using(str(tmp_path / "work")) == []


def test_an_unreachable_superlink_is_one_line(tmp_path):
    port = flower_run.free_port()
    r = subprocess.run([sys.executable, str(ROOT / "flower_run.py"), "--superlink", f"127.0.0.1:{port}", "--insecure",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: no SuperLink reachable at 127.0.0.1:{port}") and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The messages themselves: the app's server and nodes in this process, every message kept

class InProcessGrid:
    """flwr's Grid as the server uses it, with the nodes in this process: each message goes straight to
    the ClientApp, and every message, both ways, is kept."""

    def __init__(self, node_configs: list):
        self.nodes = {1000 + i: c for i, c in enumerate(node_configs)}
        self.wire = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            reply = flower_app.client(m, Context(1, node, self.nodes[node], RecordDict(), {}))
            self.wire += [m, reply]
            replies.append(reply)
        return replies


def test_only_the_global_adapter_and_numbers_cross_the_wire(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)   # what a ServerApp process is told at its start
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    args = [*SMALL, "--methods", "fedit,feddpa-f,feddpa-t,feddpa-t-calibrated", "--rounds", "2", "--cache", cache]
    grid = InProcessGrid([{"partition-id": i, "state-dir": str(tmp_path / "work" / f"state{i}")} for i in range(3)])
    flower_app.server(grid, Context(1, 0, {}, RecordDict(), {
        "train-args": " ".join([*args, "--out", str(tmp_path / "flower")]), "nodes": 3, "round-timeout": 60.0,
        "connect-timeout": 10.0}))
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
