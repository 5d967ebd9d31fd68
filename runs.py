"""The run folder: what a run writes, and how an interrupted run is checked and resumed.

    OUT/config.json        every setting of the run (train.Config), written when the run starts
    OUT/checkpoint.pt      the whole state after the last complete round (atomic; --resume reads it)
    OUT/results.json       scores, training histories and timings of every method
    OUT/adapters/<phase>/  global.safetensors and client<i>_local.safetensors

The state is a plain dict of tensors and containers, so torch.load(..., weights_only=True) reads it:
    init       the initial adapter every phase starts from
    trained    {phase: {"global", "locals", "history", "seconds"}} for every finished phase
    results    {method: {"P", "TTP", "exact", "per_client", "eval_seconds"}} for every evaluated method
    unseen     the same on --test-data's tasks (P None), for every method evaluated there
    current    None, or the phase in progress: its global adapter, rounds done, history, each client's
               (local adapter, data-order generator state), and every RNG state
    elapsed    the run's wall time up to this checkpoint, over every process that worked on it
               (train.py; results.json's total); pretrain_seconds, the first process's model loading
run_phase runs one training phase (feddpa.run_phase) and writes that state after every round; run_seeds
repeats a run per seed and summarises: mean ± std of every score, and paired bootstrap intervals for
the differences the paper's claims rest on. A porter can skip this file: it holds no part of the
method, only its checkpoint and resume hooks and the summaries.
"""
import glob
import io
import json
import os
import pickle
import random
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

import evaluation
import fed
import lora
import feddpa
from hf import atomic_write, first_line, write_safetensors

OUTPUTS = ("results.json", "checkpoint.pt", "config.json", "adapters")


class UserError(Exception):
    """A problem the user can fix; main prints it as one line."""


def get_rng() -> dict:
    return {"python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng(rng: dict):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    st = rng["numpy"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():  # a GPU run resumed on a CPU continues, not bit for bit
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------------------
# Starting: refuse to touch another run's results unless told to; read only until everything is checked

def check_new(out: str, overwrite: bool):
    taken = [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]
    if taken and not overwrite:
        raise UserError(f"{out}: holds another run ({taken[0]}); use --resume {out}, --overwrite, or another --out")


def read_config(out: str) -> dict:
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot resume from it ({first_line(e)})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: cannot resume from it (not a JSON object)")
    return saved


def start(out: str, config: dict, state: dict):
    """A new run's first writes, once everything has been checked: the old run's files go (--overwrite),
    then the initial checkpoint and config.json, so that from here on --resume always works."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    save_state(out, state)
    atomic_write(os.path.join(out, "config.json"), [json.dumps(config, indent=1).encode()])


def rescored_state(run: str, out: str, methods: list) -> dict:
    """A re-scoring run's start: the adapters the run in `run` trained (its checkpoint), none of its
    scores; refused (one line) where they cannot be had or do not cover `methods`."""
    path = os.path.join(run, "checkpoint.pt")
    if os.path.abspath(run) == os.path.abspath(out):
        raise UserError(f"--out {out}: re-scoring writes a new run and never into {run}; choose another --out")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; re-scoring reads the adapters a run's checkpoint holds (a carried "
                        "study keeps only its results)")
    state = load_state(run)
    if state.get("flower"):
        raise UserError(f"{run}: a Flower run; its local adapters live on its nodes: re-score it there")
    for method in methods:
        missing = [p for p in feddpa.phases_of(method) if p not in state.get("trained", {})]
        if missing:
            raise UserError(f"--methods {method}: {run} did not finish training its {missing[0]} phase "
                            f"(finished: {', '.join(state.get('trained', {})) or 'none'})")
    return {**state, "results": {}, "unseen": {}, "curves": {}, "current": None, "elapsed": 0.0}


def remove_partial_writes(out: str):
    for tmp in glob.glob(os.path.join(glob.escape(out), "**", "*.tmp[0-9]*"), recursive=True):
        os.remove(tmp)  # what a killed atomic_write left behind


# ----------------------------------------------------------------------------------------------
# The checkpoint

def save_state(out: str, state: dict):
    """The whole run after a round, written atomically (a kill at any moment leaves the previous one):
    adapters, round, metrics, every RNG and client generator. No optimizer state: each local run
    starts a fresh AdamW, so none carries over between rounds."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(os.path.join(out, "checkpoint.pt"), [buf.getvalue()])


def load_state(out: str) -> dict:
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no checkpoint to resume from")
    try:  # weights_only: tensors and plain containers; a checkpoint is never code to unpickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds objects other than tensors and plain data; refusing to load it") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({first_line(e)})") from None


def check_state(state, model, n_clients: int, path: str):
    """Refuse, before anything is written, a checkpoint that does not fit this run: every entry of the
    layout above with its type, each adapter with exactly the model's tensor names and shapes, each
    phase one entry per client, and generator states that load."""
    def need(ok, what):
        if not ok:
            raise UserError(f"{path}: not a checkpoint of this program ({what})")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def entry(d, keys, where):
        need(isinstance(d, dict) and set(keys) <= set(d), f"{where} lacks one of {', '.join(keys)}")
        return d

    def adapter(where, a, optional=False):
        if optional and not a:  # the Local baseline has no global adapter, a client may have no local one
            return
        need(isinstance(a, dict) and all(torch.is_tensor(t) for t in a.values()), f"{where} is not an adapter")
        try:
            lora.check_adapter(model, a)
        except ValueError as e:
            raise UserError(f"{path}: {where}: {e}") from None

    def clients(where, xs, phase):
        need(isinstance(xs, list), f"{where}: clients are not a list")
        if len(xs) != (1 if phase == "centralized" else n_clients):
            raise UserError(f"{path}: {where} has {len(xs)} clients, the data {n_clients}")

    def history(where, h):
        need(isinstance(h, list) and all(isinstance(r, dict) and all(number(r.get(k)) for k in
             ("loss", "seconds", "bytes_up", "bytes_down")) and all(isinstance(r.get(k), list) and
             all(number(x) for x in r[k]) for k in ("clients", "steps", "examples")) for r in h),
             f"{where}: malformed history")

    entry(state, ("init", "trained", "results", "current"), "the checkpoint")
    need(number(state.get("elapsed", 0.0)), "elapsed seconds")
    adapter("initial adapter", state["init"])
    need(isinstance(state["trained"], dict) and set(state["trained"]) <= set(feddpa.PHASES), "unknown phase")
    for phase, t in state["trained"].items():
        entry(t, ("global", "locals", "history", "seconds"), phase)
        adapter(f"{phase} global adapter", t["global"], optional=True)
        clients(phase, t["locals"], phase)
        for i, local in enumerate(t["locals"]):
            adapter(f"{phase} client {i} local adapter", local, optional=True)
        history(phase, t["history"])
        need(number(t["seconds"]), f"{phase}: seconds")
    need(isinstance(state["results"], dict) and set(state["results"]) <= set(feddpa.METHODS), "unknown method")
    for method, r in state["results"].items():
        entry(r, ("P", "TTP", "exact", "per_client", "eval_seconds"), method)
        need(all(number(x) for x in (r["P"], r["TTP"], r["eval_seconds"])), f"{method}: scores")
        need(all(number(entry(r["exact"], ("P", "TTP"), method)[k]) for k in ("P", "TTP")), f"{method}: exact match")
        need(isinstance(r["per_client"], list) and len(r["per_client"]) == n_clients, f"{method}: per-client scores")
        need(isinstance(r.get("no_local", []), list), f"{method}: clients without a local adapter")
    unseen = state.get("unseen", {})
    need(isinstance(unseen, dict) and set(unseen) <= set(feddpa.METHODS), "unknown method on unseen tasks")
    for method, r in unseen.items():
        entry(r, ("TTP", "exact", "per_client", "eval_seconds"), f"{method} on unseen tasks")
        need(number(r["TTP"]) and number(entry(r["exact"], ("TTP",), method)["TTP"]), f"{method}: unseen scores")
        need(isinstance(r["per_client"], list) and len(r["per_client"]) == n_clients, f"{method}: unseen per-client scores")
    cur = state["current"]
    if cur is not None:
        entry(cur, ("phase", "global", "round", "history", "clients", "rng"), "the phase in progress")
        need(cur["phase"] in feddpa.PHASES and isinstance(cur["round"], int), "the phase in progress")
        adapter(f"{cur['phase']} global adapter", cur["global"], optional=True)
        clients(cur["phase"], cur["clients"], cur["phase"])
        history(cur["phase"], cur["history"])
        for i, pair in enumerate(cur["clients"]):
            need(isinstance(pair, (list, tuple)) and len(pair) == 2, f"client {i}'s state")
            adapter(f"{cur['phase']} client {i} local adapter", pair[0], optional=True)
            try:
                torch.Generator().set_state(pair[1])
            except (TypeError, RuntimeError) as e:
                need(False, f"client {i}'s generator: {first_line(e)}")
        saved = get_rng()
        try:
            set_rng(cur["rng"])
        except Exception as e:  # whatever the random modules raise for a state that is not theirs
            need(False, f"RNG states: {first_line(e)}")
        finally:
            set_rng(saved)


# ----------------------------------------------------------------------------------------------
# Results

def budget(history: list, n_clients: int) -> dict:
    """Optimizer steps and examples per client over a phase's rounds."""
    steps, examples = [0] * n_clients, [0] * n_clients
    for h in history:
        for cid, s, e in zip(h["clients"], h["steps"], h["examples"]):
            steps[cid] += s
            examples[cid] += e
    return {"steps": steps, "examples": examples}


def write_results(out: str, config: dict, state: dict, client_tasks: list, seconds: float, client_ids: list | None = None):
    """OUT/results.json and OUT/adapters/<phase>/ (each client's local adapter named by its id, which
    --tasks keeps: client_ids, by default 0..n-1)."""
    client_ids = client_ids or list(range(len(client_tasks)))
    res = {"config": config, "client_tasks": client_tasks, "client_ids": client_ids, "methods": {}, "training": {},
           "seconds": {"total": seconds, "pretrain": state.get("pretrain_seconds", 0.0),
                       "training": {p: t["seconds"] for p, t in state["trained"].items()},
                       "evaluation": {m: r["eval_seconds"] for m, r in state["results"].items()}}}
    for phase, t in state["trained"].items():
        res["training"][phase] = {"seconds": t["seconds"], "history": t["history"],
                                  "bytes": sum(h["bytes_up"] + h["bytes_down"] for h in t["history"]),
                                  "budget": budget(t["history"], len(t["locals"]))}
        if "epsilon" in t["history"][-1]:  # DP-FedAvg: the guarantee after its last round
            res["training"][phase].update(epsilon=t["history"][-1]["epsilon"], delta=t["history"][-1]["delta"])
        d = os.path.join(out, "adapters", phase)
        os.makedirs(d, exist_ok=True)
        if t["global"]:
            write_safetensors(t["global"], os.path.join(d, "global.safetensors"))
        for i, local in zip(client_ids, t["locals"]):
            if local is not None:
                write_safetensors(local, os.path.join(d, f"client{i}_local.safetensors"))
    for method, r in state["results"].items():
        phases = [p for p in feddpa.phases_of(method) if p in res["training"]]
        per_client = [[sum(x) for x in zip(*(res["training"][p]["budget"][k] for p in phases))] if phases else []
                      for k in ("steps", "examples")]
        res["methods"][method] = {"P": r["P"], "TTP": r["TTP"], "P_exact": r["exact"]["P"],
                                  "TTP_exact": r["exact"]["TTP"], "eval_seconds": r["eval_seconds"],
                                  "no_local": r.get("no_local", []), "lambda": r.get("lambda"),
                                  "per_client": r["per_client"],
                                  "budget": {"phases": phases, "steps_per_client": per_client[0],
                                             "examples_per_client": per_client[1]}}
        if state.get("curves", {}).get(method):  # --eval-every
            res["methods"][method]["curve"] = state["curves"][method]
    if state.get("unseen"):
        res["unseen"] = {method: {"TTP": r["TTP"], "TTP_exact": r["exact"]["TTP"], "eval_seconds": r["eval_seconds"],
                                  "per_client": r["per_client"]} for method, r in state["unseen"].items()}
    atomic_write(os.path.join(out, "results.json"), [json.dumps(res, indent=1).encode()])
    return res


def print_times(seconds: dict):
    """The time breakdown of write_results, one line."""
    parts = [f"pretrain {seconds['pretrain']:.0f}s"]
    parts += [f"train {p} {s:.0f}s" for p, s in seconds["training"].items()]
    parts += [f"eval {m} {s:.0f}s" for m, s in seconds["evaluation"].items()]
    print(f"time: {', '.join(parts)}; total {seconds['total']:.0f}s")


def print_unseen(results: dict, test_data: str, tasks: list):
    print(f"\nunseen tasks ({test_data}: {', '.join(tasks)}): TTP, each client's mean over them")
    for method, r in results.items():
        print(f"{method:<22}{r['TTP']:7.1f}{r['exact']['TTP']:8.1f}")


def epsilon_text(eps) -> str:
    return "∞ (no noise)" if eps is None else f"{eps:.3g}"


def print_privacy(training: dict):
    """Each phase's client-level guarantee where DP-FedAvg ran (--dp-clip), and why the others need none."""
    if not any("epsilon" in t for t in training.values()):
        return
    print("\nclient-level DP on the global adapter (DP-FedAvg; a client's whole data is what neighbours differ by):")
    for phase, t in training.items():
        if "epsilon" in t:
            print(f"  {phase:<12} (ε, δ) = ({epsilon_text(t['epsilon'])}, {t['delta']:g}) after {len(t['history'])} round(s)")
        elif feddpa.PHASES[phase].starts_from:
            print(f"  {phase:<12} its global adapter is {feddpa.PHASES[phase].starts_from}'s (the same guarantee); "
                  "its fine-tuning round sends nothing")
        elif not feddpa.PHASES[phase].sends:
            print(f"  {phase:<12} sends nothing (ε = 0)")
        elif feddpa.PHASES[phase].pooled:
            print(f"  {phase:<12} no federation: the data is pooled in one place, no client-level guarantee")


def print_table(results: dict, tasks: list, client_tasks: list, verbose: bool):
    print(f"\n{'method':<22}{'P':>7}{'TTP':>7}{'P(EM)':>7}{'TTP(EM)':>8}   {'λ own/other':>11} {'AUROC':>5}"
          "   (ROUGE-1 F1 / exact match, %)")
    for method, r in results.items():
        name = method + ("+" if r.get("no_local") else "")
        lam = r.get("lambda")
        diag = f"   {lam['own']:5.2f}/{lam['other']:<5.2f} {lam['auroc']:5.2f}" if lam and lam["clients"] else ""
        print(f"{name:<22}{r['P']:7.1f}{r['TTP']:7.1f}{r['exact']['P']:7.1f}{r['exact']['TTP']:8.1f}{diag}")
    if any(feddpa.METHODS[m].mixing == "oracle" for m in results):
        print("-oracle rows: a bound, not a method: the training mix on the client's own task, the global adapter "
              "alone on the others (they read the test instance's task)")
    for method, r in results.items():
        if r.get("no_local"):
            print(f"+ {method}: client(s) {', '.join(map(str, r['no_local']))} were never sampled to train a local "
                  "adapter and are scored with the global adapter alone (Local: the base model)")
    if verbose:
        for method, r in results.items():
            print(f"\n{method}: ROUGE-1 per client (rows, own task marked *) and test task (columns)")
            print(" " * 10 + "".join(f"{t[:9]:>10}" for t in tasks))
            for i, scores in enumerate(r["per_client"]):
                print(f"client {i:<3}" + "".join(f"{scores[t]['rouge1']:9.1f}{'*' if t == client_tasks[i] else ' '}"
                                                 for t in tasks))


# ----------------------------------------------------------------------------------------------
# One training phase, checkpointed after every round and resumed from the last complete one

def run_phase(name: str, phase, state: dict, save, *, out: str, progress: bool = False, train_round=None,
              on_round=None):
    """feddpa.run_phase, checkpointed: state["current"] holds the phase's progress after each round
    (continued from there if it is this phase's), state["trained"][name] its result at the end.
    train_round: how the clients are reached; by default phase.clients, in this process (a Flower server
    passes its own, and its phase's clients are placeholders that never hold a local adapter).
    on_round(name, phase, federation): after each round, before its checkpoint (train.py's curve)."""
    federation = None
    resume = state.get("current")
    if resume and resume["phase"] == name:  # continue from the last complete round
        federation = fed.Federation(resume["global"], len(phase.clients), resume["round"], resume["history"])
        for c, (local, gen) in zip(phase.clients, resume["clients"]):
            c.local = local
            c.generator.set_state(gen)
        set_rng(resume["rng"])

    def checkpoint(f: fed.Federation):
        h = f.history[-1]
        if progress:  # progress on stderr; results on stdout
            tqdm.write(f"{name:>12} round {h['round'] + 1:>2} of {phase.rounds}: loss {h['loss']:.3f}, "
                       f"{len(h['clients'])} clients, {(h['bytes_down'] + h['bytes_up']) / 1e6:.2f} MB, {h['seconds']:.1f}s",
                       file=sys.stderr)
        if on_round is not None:
            on_round(name, phase, f)
        state["current"] = {"phase": name, "global": f.global_adapter, "round": f.round, "history": f.history,
                            "clients": [(c.local, c.generator.get_state()) for c in phase.clients], "rng": get_rng()}
        save(state)

    try:
        federation = feddpa.run_phase(name, phase, federation=federation,
                                      train_round=train_round, on_round_end=checkpoint, progress=progress)
    except (fed.Diverged, fed.NoReplies) as e:  # nothing of the failed round is saved: the checkpoint keeps the last good one
        done = state["current"]["round"] if state.get("current") and state["current"]["phase"] == name else 0
        raise type(e)(f"{name}: {e}; stopped, {os.path.join(out, 'checkpoint.pt')} keeps the last "
                           f"good round ({done} of {phase.rounds} complete)") from None
    hist = federation.history
    dp = f", (ε, δ) = ({epsilon_text(hist[-1]['epsilon'])}, {hist[-1]['delta']:g})" if "epsilon" in hist[-1] else ""
    print(f"{name:>12}: {phase.rounds} round(s), loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}, "
          f"{sum(h['bytes_up'] + h['bytes_down'] for h in hist) / 1e6:.2f} MB sent, {sum(h['seconds'] for h in hist):.1f}s{dp}")
    result = feddpa.phase_result(name, federation.global_adapter, phase.clients, trained=state["trained"])
    state["trained"][name] = {**result, "history": hist, "seconds": sum(h["seconds"] for h in hist)}
    state["current"] = None
    save(state)


# ----------------------------------------------------------------------------------------------
# Several seeds: mean and standard deviation of every method's scores

METRICS = ("P", "TTP", "P_exact", "TTP_exact")
# The differences the paper's claims rest on: the dual adapter against FedIT (P and TTP) and against
# Local on P (FedDPA-T with the paper's lambda and with the calibrated weight, FedDPA-F), and the paper's
# lambda against the fixed mix, the calibrated weight and the sum of the two adapters.
COMPARISONS = [("feddpa-t", "fedit", "P"), ("feddpa-t", "fedit", "TTP"), ("feddpa-t", "local", "P"),
               ("feddpa-t-calibrated", "fedit", "TTP"), ("feddpa-t-calibrated", "local", "P"),
               ("feddpa-f", "fedit", "P"), ("feddpa-f", "fedit", "TTP"), ("feddpa-f", "local", "P"),
               ("feddpa-t", "feddpa-t-fixed", "P"), ("feddpa-t", "feddpa-t-fixed", "TTP"),
               ("feddpa-t", "feddpa-t-calibrated", "P"), ("feddpa-t", "feddpa-t-calibrated", "TTP"),
               ("feddpa-t-sum", "feddpa-t", "P"), ("feddpa-t-sum", "feddpa-t", "TTP"),
               ("feddpa-f", "feddpa-f-fixed", "P"), ("feddpa-f", "feddpa-f-fixed", "TTP")]


def verdict(d: dict) -> str:
    """A paired difference's reading (DEVELOPERS.md): above or below only where its 95% interval excludes
    0 and every seed's difference has that sign; identical where the two methods' answers never differ."""
    (lo, hi), each = d["ci95"], d["per_seed"]
    if lo == hi == 0 and not any(each):
        return "identical"
    return ("above" if lo > 0 and all(x > 0 for x in each) else
            "below" if hi < 0 and all(x < 0 for x in each) else "undecided")


def mean_std(xs: list) -> tuple:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def run_seeds(out: str, seeds: list, config: dict, run_one, defaults: dict | None = None):
    """run_one(seed, folder, begun) for each seed in OUT/seed<N> (begun: the folder holds a started run, to
    resume), then the summary over seeds. A seed whose folder holds its results.json has finished and is
    read, not run again: a study can be carried between machines as its config.json and each finished
    seed's results.json alone (no checkpoints, no adapters). defaults: the value of a setting that a seed
    written before it existed lacks."""
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "config.json"), [json.dumps(config, indent=1).encode()])
    per_seed = {}
    for seed in seeds:
        folder = os.path.join(out, f"seed{seed}")
        path = os.path.join(folder, "results.json")
        finished = os.path.isfile(path)
        begun = os.path.isfile(os.path.join(folder, "config.json"))
        print(f"\n=== seed {seed}: {folder}{' (finished)' if finished else ' (resumed)' if begun else ''}")
        if not finished:
            run_one(seed, folder, begun)
        per_seed[seed] = read_seed(path, {**config, "seed": seed, "seeds": ""}, defaults)
    write_seed_summary(out, config, per_seed)


SEED_FREE = ("out", "device", "plain", "rescore")  # a seed's settings that may differ from its study's: where, on what
# and how it ran, and (re-scoring) which of the re-scored study's seeds it reads


def read_seed(path: str, want: dict, defaults: dict | None = None) -> dict:
    """One seed's results.json, refused (one line) unless it was run with this study's settings (a
    setting its config lacks, written before the setting existed, compared at its default)."""
    try:
        with open(path) as f:
            res = json.load(f)
        got = {**(defaults or {}), **res["config"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a finished seed's results ({first_line(e)})") from None
    for key in sorted(set(want) | set(got)):
        if key not in SEED_FREE and got.get(key) != want.get(key):
            raise UserError(f"{path}: a seed of another study: its {key} is {got.get(key)!r}, this study's {want.get(key)!r}")
    return res


def write_seed_summary(out: str, config: dict, per_seed: dict):
    """OUT/results.json: every seed's results and, per method, each metric's mean and (sample) std over
    seeds; and the table of them."""
    methods = list(next(iter(per_seed.values()))["methods"])
    summary = {}
    for method in methods:
        rows = [res["methods"][method] for res in per_seed.values()]
        summary[method] = {k: mean_std([r[k] for r in rows]) for k in METRICS}
        if all(r.get("lambda") for r in rows):
            summary[method].update({f"lambda_{k}": mean_std([r["lambda"][k] for r in rows]) for k in ("own", "other", "auroc")})
    intervals = paired_differences(list(per_seed.values()))
    res = {"config": config, "seeds": list(per_seed), "summary": summary, "differences": intervals,
           "per_seed": per_seed}
    if all("unseen" in r for r in per_seed.values()):  # --test-data: TTP on the unseen tasks
        res["summary_unseen"] = {m: {k: mean_std([r["unseen"][m][k] for r in per_seed.values()])
                                     for k in ("TTP", "TTP_exact")} for m in next(iter(per_seed.values()))["unseen"]}
        res["differences_unseen"] = paired_differences(list(per_seed.values()), "unseen")
    atomic_write(os.path.join(out, "results.json"), [json.dumps(res, indent=1).encode()])
    print(f"\nmean ± std over seeds {', '.join(map(str, per_seed))} (ROUGE-1 F1 / exact match, %)")
    print(f"{'method':<22}{'P':>13}{'TTP':>13}{'P(EM)':>13}{'TTP(EM)':>13}   {'λ own':>11} {'λ other':>11} {'AUROC':>11}")
    for method, s in summary.items():
        lam = "".join(f" {s[k][0]:5.2f}±{s[k][1]:<4.2f}" for k in ("lambda_own", "lambda_other", "lambda_auroc") if k in s)
        print(f"{method:<22}" + "".join(f"{s[k][0]:7.1f} ±{s[k][1]:4.1f}" for k in METRICS) + ("  " + lam if lam else ""))
    if "summary_unseen" in res:
        print(f"\nunseen tasks ({config.get('test_data')}): TTP mean ± std over seeds")
        for method, s in res["summary_unseen"].items():
            print(f"{method:<22}" + "".join(f"{s[k][0]:7.1f} ±{s[k][1]:4.1f}" for k in ("TTP", "TTP_exact")))
    print_differences(intervals, "")
    print_differences(res.get("differences_unseen", []), " on unseen tasks")
    print(f"\nresults: {os.path.join(out, 'results.json')}")


DIFFERENCE_COLUMNS = ("(ROUGE-1 points): mean over seeds, 95% bootstrap interval over test instances, verdict "
                      "(above/below: the interval excludes 0 and every seed agrees), each seed's difference")


def difference_cells(d: dict) -> str:
    """A paired difference as DIFFERENCE_COLUMNS name its cells."""
    lo, hi = d["ci95"]
    return f"{d['diff']:+6.1f}  [{lo:+5.1f}, {hi:+5.1f}]  {verdict(d):<9}  " + " ".join(f"{x:+.1f}" for x in d["per_seed"])


def print_differences(intervals: list, where: str):
    if intervals:
        print(f"\npaired differences{where} {DIFFERENCE_COLUMNS}")
        for d in intervals:
            print(f"{d['a'] + ' - ' + d['b']:<36}{d['metric']:>4} " + difference_cells(d))


def paired_differences(runs: list, key: str = "methods") -> list:
    """evaluation.paired_difference for each of COMPARISONS whose two methods every run has (results.json
    of each seed; runs written before per-instance scores were kept have none). key "unseen": on the
    unseen tasks, TTP only (no client's own task is among them)."""
    out = []
    for a, b, metric in COMPARISONS:
        if not all(a in r[key] and b in r[key] for r in runs) or (key == "unseen" and metric == "P"):
            continue
        rows = [[r[key][m]["per_client"] for r in runs] for m in (a, b)]
        if not all("rouge1_each" in s for row in rows for per_client in row for c in per_client for s in c.values()):
            continue
        d = evaluation.paired_difference(*rows, client_tasks=[r["client_tasks"] for r in runs], metric=metric)
        out.append({"a": a, "b": b, "metric": metric, **d})
    return out
