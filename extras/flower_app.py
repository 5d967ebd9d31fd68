"""FedDPA across processes and machines with Flower (flwr 1.42, Message API): one ServerApp, and one
ClientApp on each SuperNode, where a SuperNode is one client. An optional extra: pip install
flwr==1.42.0. flower_run.py starts a whole deployment on one machine; the README's "Run it
across machines" section says how to start one on several.

The method is the project's own, not a second implementation: the server runs fed.run_rounds (client
sampling, FedAvg, history) with runs.run_phase's checkpoint after every round, reaching the chosen
clients with Flower messages instead of fed.in_process; each node runs the client step of
feddpa.setup_phase on its own data and scores itself with evaluation.evaluate_client. `train-args`
(train.py's flags, parsed by train.py) carries every setting, so a deployment and `python train.py`
with the same flags train the same adapters (test_flower.py checks it bit for bit).

What crosses the wire, and nothing else:
  server -> node   the settings, the phase and round, the global adapter (FedDPA-F: FedIT's final one)
  node -> server   its trained copy of the global adapter, its example count and training metrics;
                   at the end its scores on every task (numbers, never an adapter)
A node's local adapter, data and data order live on the node, in files under its `state-dir`, one
per round (a node starts a fresh process per message, and Flower's context.state lasts one run only):
a node that is killed and restarted, or a new run with the same settings, goes on from its files.

The server holds only the global adapter and the round loop. A round waits `round-timeout` seconds
for replies and averages those that came (the history lists the chosen clients that did not reply,
as "missing"). A node that is killed and restarted meanwhile comes back under a new node id: its
client gets the round again there, and trains it from its files, as if it had never stopped. A round
that no node answered is sent again; every completed round is checkpointed, and `--resume OUT` in
train-args continues a run from its last one. Runs FedIT, FedDPA-F and FedDPA-T (every weighting);
the base model, Local and Centralized need no federation: run them with train.py. With --dp-clip in
train-args (DP-FedAvg), each node clips its update before it sends it and the server adds the noise,
from the operating system's secure randomness unless the run config's dp-seeded-noise is true.

Top to bottom: the settings; the node (its data and model, its state files, train, describe,
evaluate); the server (finding the nodes, a round over Flower, the phases, the evaluation).
"""
import glob
import hashlib
import json
import os
import shlex
import time
from dataclasses import asdict, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import data
import evaluation
import fast
import fed
import hf
import feddpa
import lora
import runs
import train
from runs import UserError

# the phases whose clients talk to a server: those that send a global adapter to clients of their own data
FLOWER_PHASES = tuple(name for name, spec in feddpa.PHASES.items() if spec.sends and not spec.pooled)
METHODS = tuple(m for m, method in feddpa.METHODS.items() if method.phase in FLOWER_PHASES)
POLL = 0.5  # seconds between the server's looks for replies
EVAL_ONLY = ("methods", "test_per_task", "max_new_tokens", "num_beams", "eval_batch_size", "out", "device", "cache")


def settings(train_args: str) -> tuple:
    """train.py's Config and arguments from the run's `train-args` string, checked as train.py checks them."""
    cfg, args = train.parse_args(shlex.split(train_args))
    bad = [m for m in cfg.methods.split(",") if m not in METHODS]
    if bad:
        raise UserError(f"--methods {','.join(bad)}: a Flower run trains {', '.join(FLOWER_PHASES)}; "
                        f"run the base model, Local and Centralized with train.py")
    if cfg.seeds:
        raise UserError("--seeds: start one Flower run per seed")
    if cfg.test_data:
        raise UserError("--test-data: a Flower run scores each client on its own data's tests only")
    for flag, why in (("eval_every", "a node keeps only its last local adapter"), ("rescore", "its local adapters are on the nodes"),
                      ("tasks", "a node is the client at its place in the data")):
        if getattr(cfg, flag):
            raise UserError(f"--{flag.replace('_', '-')}: not over Flower ({why}); use train.py")
    return cfg, args


def run_key(cfg: train.Config) -> str:
    """Names a node's state for one set of training settings: the same settings find the same files."""
    kept = {k: v for k, v in asdict(cfg).items() if k not in EVAL_ONLY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def to_record(adapter: dict) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in adapter.items()})


def from_record(record: ArrayRecord) -> dict:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


# ----------------------------------------------------------------------------------------------
# The node: one client, its data, model and state

client = ClientApp()


class Node:
    """One SuperNode's client for one message: node-config `partition-id` (which client of the data it
    is), `data` (the federated data; default: train-args' --data) and `state-dir` (where its local
    adapter and data order are kept; default: <cache>/node<partition-id>)."""

    def __init__(self, content: RecordDict, node_config: dict):
        self.cfg, _ = settings(content["run"]["train-args"])
        if "partition-id" not in node_config:
            raise UserError("this SuperNode has no partition-id in its --node-config")
        self.id = int(node_config["partition-id"])
        cfg = self.cfg
        self.fd = train.load_data(str(node_config.get("data", cfg.data)), cfg.seed, cfg.clients, cfg.dirichlet_alpha,
                                  cfg.min_client_size, cfg.test_per_task)
        if not 0 <= self.id < len(self.fd.clients):
            raise UserError(f"partition-id {self.id}: the data has clients 0..{len(self.fd.clients) - 1}")
        self.records = self.fd.clients[self.id]
        self.task = self.fd.client_tasks[self.id]
        default_dir = os.path.join(os.path.expanduser(cfg.cache), f"node{self.id}")
        self.dir = os.path.join(str(node_config.get("state-dir", default_dir)), f"run-{run_key(cfg)}")

    def model(self):
        """The foundation model with its LoRA slots, and the tokenizer, on the run's device."""
        self.device = train.choose_device(self.cfg.device)
        model_dir, tok = train.base_and_tokenizer(self.cfg, self.device, False)
        return train.load_model(self.cfg, model_dir, self.device), tok

    def state_path(self, phase: str, round_: int) -> str:
        return os.path.join(self.dir, phase, f"round{round_}.pt")

    def last_state(self, phase: str, before: int):
        """The client's state after the last round of `phase` it trained before round `before`: (round,
        local adapter or None, data-order generator state), or None if it has trained none."""
        done = sorted((int(os.path.basename(p)[5:-3]), p) for p in glob.glob(os.path.join(self.dir, phase, "round*.pt")))
        done = [(r, p) for r, p in done if r < before]
        if not done:
            return None
        s = torch.load(done[-1][1], map_location="cpu", weights_only=True)
        return done[-1][0], s["local"], s["generator"]

    def save_state(self, phase: str, round_: int, local, generator):
        os.makedirs(os.path.join(self.dir, phase), exist_ok=True)
        torch.save({"local": local, "generator": generator.get_state()}, self.state_path(phase, round_) + ".tmp")
        os.replace(self.state_path(phase, round_) + ".tmp", self.state_path(phase, round_))


@client.query()
def describe(msg: Message, context: Context) -> Message:
    """Which client this node is, and what it holds in counts: no data, no adapter."""
    node = Node(msg.content, context.node_config)
    info = {"partition-id": node.id, "n-clients": len(node.fd.clients), "task": node.task,
            "tasks": json.dumps(list(node.fd.tests))}
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


@client.train()
def train_step(msg: Message, context: Context) -> Message:
    """One round of one phase on this client: the phase's client step (feddpa.setup_phase) from the
    client's state on disk and the global adapter received; the new state goes to disk, the trained copy
    of the global adapter and the counts go back."""
    node = Node(msg.content, context.node_config)
    cfg, run = node.cfg, msg.content["run"]
    phase_name, round_ = str(run["phase"]), int(run["round"])
    received = from_record(msg.content["global"])
    model, tok = node.model()
    encoded = {i: [] for i in range(len(node.fd.clients))}  # this client's records only: the others are not its to train on
    encoded[node.id] = data.encode_clients([node.records], tok, cfg.cutoff, cfg.max_dropped)[0]
    phase = feddpa.setup_phase(phase_name, model, pad_id=tok.pad_id, recipe=train.recipe(cfg), datasets=encoded,
                               init=received, trained={p: {"global": received} for p in feddpa.PHASES})  # the adapter to start from
    me = phase.clients[node.id]
    last = node.last_state(phase_name, round_)
    if last is not None:
        _, me.local, generator = last
        me.generator.set_state(generator)
    print(f"client {node.id}: {phase_name} round {round_ + 1}, "
          f"{'local adapter from round ' + str(last[0] + 1) + ' on disk' if last and last[1] else 'no local adapter yet'}",
          flush=True)
    with fast.enabled(model, rows=64 * cfg.micro_batch_size, on=not cfg.plain):  # as train.py
        try:
            update, local, metrics = phase.step(round_, me, received)
        except fed.Diverged as e:
            raise fed.Diverged(f"{e} of client {node.id} in round {round_ + 1}") from None
    node.save_state(phase_name, round_, local, me.generator)
    sent, norm = update.adapter, {}
    if sent and phase.dp is not None:  # DP-FedAvg: the update is clipped here, the noise added at the server
        change, before = fed.clipped(sent, received, phase.dp.clip)
        sent, norm = {k: (received[k].double() + change[k]).to(received[k].dtype) for k in received}, {"update-norm": before}
    reply = RecordDict({"metrics": MetricRecord({**{k: float(v) for k, v in metrics.items()},
                                                 "n-examples": update.n_examples, **norm})})
    if sent:  # FedDPA-F's fine-tuning sends nothing back
        reply["global"] = to_record(sent)
    return Message(reply, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """This client's scores on every task with each method's adapters and mix: the global adapters
    received, its own local ones from disk (the last round of each phase it trained)."""
    node = Node(msg.content, context.node_config)
    cfg, run = node.cfg, msg.content["run"]
    model, tok = node.model()
    dec = evaluation.Decode(cfg.max_new_tokens, cfg.num_beams, cfg.eval_batch_size, cfg.cutoff)
    methods, rec = str(run["methods"]).split(","), train.recipe(cfg)
    phases = {feddpa.METHODS[m].phase for m in methods}
    globals_ = {p: from_record(msg.content[f"global.{p}"]) for p in phases}
    last = {p: node.last_state(p, 10 ** 9) for p in phases}  # each phase's final files
    scores, no_local, seconds = {}, [], {}
    ev = evaluation.Evaluator(model, tok, dec, node.device, rec)  # each answer set generated once
    for method in methods:
        t0 = time.time()
        phase = feddpa.METHODS[method].phase
        local = last[phase][1] if last[phase] else None
        with fast.enabled(model, rows=cfg.eval_batch_size * cfg.num_beams, on=not cfg.plain), \
                torch.autocast(node.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            scores[method] = evaluation.evaluate_client(
                method, ev, node.fd.tests,
                client=evaluation.EvalClient(node.id, node.records, node.task, globals_[phase], local))
        if local is None and not feddpa.METHODS[method].shared:
            no_local.append(method)
        seconds[method] = time.time() - t0
    reply = RecordDict({"scores": ConfigRecord({"scores": json.dumps(scores), "no-local": json.dumps(no_local)}),
                        "seconds": MetricRecord(seconds)})
    return Message(reply, reply_to=msg)


# ----------------------------------------------------------------------------------------------
# The server: the global adapter and the round loop

server = ServerApp()


class Federation:
    """The nodes as the server reaches them: partition-id -> node id. A SuperNode that is restarted
    comes back under a new node id; the server learns it before every round and while it waits."""

    def __init__(self, grid: Grid, train_args: str, n_clients: int, timeout: float):
        self.grid, self.train_args, self.n, self.timeout = grid, train_args, n_clients, timeout
        self.node_of, self.known, self.info = {}, set(), {}

    def message(self, records: dict, kind: str, node_id: int, ttl: float = 0.0, **run) -> Message:
        content = RecordDict({"run": ConfigRecord({"train-args": self.train_args, **run}), **records})
        return Message(content, node_id, kind, ttl=ttl or self.timeout)  # a message outlives no wait for it

    def exchange(self, messages: dict, deadline: float, resend=None) -> dict:
        """Push messages (key -> Message) and collect their replies until all have come or the deadline
        (time.time()) passes: key -> reply. resend(keys still waiting) -> {key: Message}: new messages
        that replace those keys' (their node is gone and a new one stands for it). flwr's
        send_and_receive looks for replies every 3 s; this looks every POLL s."""
        pending = {}  # message id -> key

        def push(batch: dict):
            for key, mid in zip(batch, self.grid.push_messages(list(batch.values())) if batch else []):
                if mid is not None:  # None: the SuperLink refused it, so no reply will come
                    pending[mid] = key
        push(messages)
        replies = {}
        while pending and time.time() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    replies.setdefault(key, reply)
            if resend and pending:
                again = resend(set(pending.values()))
                for mid in [m for m, key in pending.items() if key in again]:
                    del pending[mid]
                push(again)
            if pending:
                time.sleep(POLL)
        return replies

    def discover(self, wait: float = 0.0, deadline: float = 0.0) -> list:
        """Ask nodes not seen before which client they are, waiting up to `wait` s until all n are
        there; returns the clients that came back under a new node id. A node that does not answer
        by the deadline (default: a round's timeout) is asked again next time."""
        t0, moved = time.time(), []
        while True:
            new = [i for i in self.grid.get_node_ids() if i not in self.known]
            replies = self.exchange({i: self.message({}, "query", i) for i in new}, deadline or time.time() + self.timeout)
            self.known.update(replies)
            for node_id, reply in replies.items():
                if reply.has_error():
                    raise UserError(f"node {node_id}: {reply.error.reason}")
                info = reply.content["info"]
                c = int(info["partition-id"])
                if int(info["n-clients"]) != self.n:
                    raise UserError(f"client {c}'s data has {info['n-clients']} clients but the federation has "
                                    f"{self.n} (pass --clients {self.n}, or start that many nodes)")
                if c in self.node_of and self.node_of[c] != node_id:
                    moved.append(c)
                self.node_of[c], self.info[c] = node_id, info
            if len(self.node_of) >= self.n or time.time() - t0 > wait:
                break
            time.sleep(1.0)
        if wait and len(self.node_of) < self.n:
            raise UserError(f"only clients {sorted(self.node_of)} of {self.n} connected within {wait:.0f}s")
        return moved

    def to_clients(self, make, clients, timeout: float, what: str) -> dict:
        """make(node id) -> Message to each client's node; the replies within timeout s: client -> reply.
        A client whose node comes back under a new node id before it replied (killed and restarted)
        gets the message again there: the old node is gone, and the message with it."""
        deadline = time.time() + timeout
        self.discover(deadline=deadline)

        def resend(waiting: set) -> dict:
            back = [c for c in self.discover(deadline=deadline) if c in waiting]
            for c in back:
                print(f"{what}: client {c} is back under a new node id; sending it the message again", flush=True)
            return {c: make(self.node_of[c]) for c in back}
        return self.exchange({c: make(self.node_of[c]) for c in clients if c in self.node_of}, deadline, resend)

    def train_round(self, phase: str, rounds: int, attempts: int = 3):
        """fed.run_rounds' train_round over Flower: the global adapter to each chosen node, the
        replies that arrive within the timeout back. A round in which no node replied is sent again
        (up to `attempts` times): a node trains a round from its files of the rounds before, so a
        round trained twice ends the same."""
        def train_round(round_, chosen, global_adapter) -> dict:
            for attempt in range(attempts):
                replies = send(round_, chosen, global_adapter)
                if replies:
                    break
                print(f"{phase:>9} round {round_ + 1}: no client replied within {self.timeout:.0f}s"
                      + ("; sending it again" if attempt + 1 < attempts else ""), flush=True)
            missing = [c for c in chosen if c not in replies]
            print(f"{phase:>9} round {round_ + 1} of {rounds}: {len(replies)} of {len(chosen)} clients replied"
                  + (f", missing {missing}" if missing else ""), flush=True)
            return replies

        def send(round_, chosen, global_adapter) -> dict:
            down = to_record(global_adapter)

            def make(node: int) -> Message:
                return self.message({"global": down}, "train", node, phase=phase, round=round_)
            replies = {}
            for c, reply in self.to_clients(make, chosen, self.timeout, f"{phase} round {round_ + 1}").items():
                if reply.has_error():
                    print(f"{phase} round {round_ + 1}: client {c} failed: {reply.error.reason}", flush=True)
                    continue
                m = reply.content["metrics"]
                metrics = {k: v for k, v in m.items() if k not in ("n-examples", "update-norm")}
                metrics.update(steps=int(m["steps"]), examples=int(m["examples"]))
                sent = reply.content.array_records.get("global")
                replies[c] = (fed.Update(from_record(sent) if sent else {}, int(m["n-examples"]), m.get("update-norm")),
                              metrics)
            return replies
        return train_round

    def evaluate(self, methods: list, globals_: dict) -> tuple:
        """Every client's scores for each method, from its node: per method, a per-client list."""
        down = {f"global.{p}": to_record(g) for p, g in globals_.items()}
        wait = self.timeout * len(methods)  # a round's timeout per method

        def make(node: int) -> Message:
            return self.message(down, "evaluate", node, wait, methods=",".join(methods))
        scores, no_local, seconds = {}, {}, {}
        for c, reply in self.to_clients(make, range(self.n), wait, "evaluation").items():
            if reply.has_error():
                raise UserError(f"client {c} failed to evaluate: {reply.error.reason}")
            record = reply.content["scores"]
            scores[c], no_local[c] = json.loads(record["scores"]), json.loads(record["no-local"])
            seconds[c] = reply.content["seconds"]
        if len(scores) < self.n:
            raise UserError(f"clients {sorted(set(range(self.n)) - set(scores))} did not send their scores")
        clients = range(self.n)
        return ({m: [scores[c][m] for c in clients] for m in methods},
                {m: [c for c in clients if m in no_local[c]] for m in methods},
                {m: max(seconds[c][m] for c in clients) for m in methods})


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Train the phases the methods need over the nodes, checkpointing every round, then collect every
    client's scores and write results.json as train.py does."""
    t_start = time.time()
    conf = context.run_config
    train_args, n = str(conf["train-args"]), int(conf["nodes"])
    cfg, args = settings(train_args)
    cfg, state = train.open_run(cfg, args)
    device = train.choose_device("cpu")  # the server only averages adapters
    t0 = time.time()
    model = train.load_model(cfg, train.base_and_tokenizer(cfg, device, False)[0], device)
    nodes = Federation(grid, train_args, n, float(conf["round-timeout"]))
    nodes.discover(wait=float(conf["connect-timeout"]))
    if state is None:
        init = hf.read_peft(cfg.init_adapter, lora.adapter_tensors(model, "global")) if cfg.init_adapter else lora.get_adapter(model, "global")
        # "flower": its local adapters are on the nodes (train.py --rescore refuses it)
        state = {"init": init, "trained": {}, "results": {}, "current": None, "pretrain_seconds": time.time() - t0,
                 "flower": True}
        runs.start(cfg.out, asdict(cfg), state)
    else:
        runs.check_state(state, model, n, os.path.join(cfg.out, "checkpoint.pt"))
        runs.remove_partial_writes(cfg.out)
    methods, rec = cfg.methods.split(","), train.recipe(cfg)
    if rec.dp is not None and not bool(conf.get("dp-seeded-noise", False)):  # a deployment's noise: no one can replay it
        rec = replace(rec, dp=replace(rec.dp, seeded_noise=False))
    needed = {p for m in methods for p in feddpa.phases_of(m)}
    print(f"Flower federation of {n} clients; training {', '.join(p for p in FLOWER_PHASES if p in needed)}; "
          f"output {cfg.out}", flush=True)
    for name in FLOWER_PHASES:
        if name not in needed or name in state["trained"]:
            continue
        # the server's phase: the schedule of feddpa.setup_phase, with placeholder clients that hold no data
        phase = feddpa.setup_phase(name, model, pad_id=0, recipe=rec, datasets={i: [] for i in range(n)}, init=state["init"],
                                   trained=state["trained"])
        runs.run_phase(name, phase, state, lambda s: runs.save_state(cfg.out, s), out=cfg.out,
                       train_round=nodes.train_round(name, phase.rounds))
    todo = [m for m in methods if m not in state["results"]]
    tasks = [str(nodes.info[c]["task"]) for c in range(n)]
    if todo:
        globals_ = {p: state["trained"][p]["global"] for p in {feddpa.METHODS[m].phase for m in todo}}  # FedDPA-F's: FedIT's
        per_client, no_local, seconds = nodes.evaluate(todo, globals_)
        for m in todo:
            state["results"][m] = evaluation.summarize(per_client[m], tasks, no_local=no_local[m], seconds=seconds[m])
        runs.save_state(cfg.out, state)
    res = runs.write_results(cfg.out, asdict(cfg), state, tasks, time.time() - t_start)
    runs.print_table(state["results"], json.loads(nodes.info[0]["tasks"]), tasks, args.verbose)
    runs.print_times(res["seconds"])
    print(f"\nresults: {os.path.join(cfg.out, 'results.json')}  ({time.time() - t_start:.0f}s)", flush=True)
