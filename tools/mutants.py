"""Prove that the tests bite: plant each fault below, one at a time, in a temporary copy of the repository,
run the method's tests against it, and report which test caught it.

    python tools/mutants.py                 # every fault (about 90 minutes on 2 cores)
    python tools/mutants.py --only 3,7      # some of them, by number
    python tools/mutants.py --list
    python tools/mutants.py --only 27 --tests tests/test_lora.py   # against some tests only, to check quickly

Prints one line per fault, "caught by <test>" or "SURVIVED", and exits 1 if any fault survives (or if
the unplanted copy does not pass to begin with). Each fault is a literal text replacement that must
match exactly once, so a change to the code that moves a line makes the script say so, not pass.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_oracle.py", "test_feddpa.py", "tests/test_fed.py", "tests/test_lora.py", "tests/test_data.py",
         "tests/test_conformance.py", "tests/test_paper.py", "tests/test_diagnose.py", "tests/test_privacy.py",
         "tests/test_plot.py", "tests/test_flower.py", "tests/test_runs.py::test_ablations_are_paired_against_the_study_they_rescore"]

PRODUCT_AVERAGE = '''    out = {k: sum(wi * u.adapter[k].double() for wi, u in zip(w, updates)).to(updates[0].adapter[k].dtype)
           for k in updates[0].adapter}
    for k in [k for k in out if k.endswith("lora_B.weight")]:  # B such that B A_avg = mean of B_k A_k
        a = k.replace("lora_B", "lora_A")
        prod = sum(wi * (u.adapter[k].double() @ u.adapter[a].double()) for wi, u in zip(w, updates))
        out[k] = (prod @ torch.linalg.pinv(out[a].double())).to(out[k].dtype)
    return out
    return {k: sum(wi * u.adapter[k].double() for wi, u in zip(w, updates)).to(updates[0].adapter[k].dtype)'''

MUTANTS = [  # (fault, file, text, replacement)
    ("FedDPA-T's local phase trains without the global adapter mixed in", "feddpa.py",
     "weights=mix(local_weight), trains=\"local\"", "weights={\"local\": 1.0}, trains=\"local\""),
    ("FedDPA-T's local adapter is not kept between rounds", "feddpa.py",
     "client.local if client.local is not None else fresh_local(model, seed, client.id)",
     "fresh_local(model, seed, client.id)"),
    ("lambda is given to the other adapter", "evaluation.py",
     "mix(lams[idx].repeat_interleave(dec.num_beams), to)",
     "mix(lams[idx].repeat_interleave(dec.num_beams), \"global\" if to == \"local\" else \"local\")"),
    ("the representation is computed with the global adapter", "feddpa.py",
     "    with lora.mixed(model, {\"local\": 1.0}):\n        return model.pooled",
     "    with lora.mixed(model, {\"global\": 1.0}):\n        return model.pooled"),
    ("the global phase trains with the local adapter mixed in", "feddpa.py",
     "adapters={\"global\": global_adapter}, weights={\"global\": 1.0},",
     "adapters={\"global\": global_adapter, \"local\": lora.get_adapter(model, \"local\")}, weights=mix(0.5, \"global\"),"),
    ("clients chain one after another instead of each starting from the server's aggregate", "fed.py",
     "client_update(round_, client, global_adapter)",
     "client_update(round_, client, list(replies.values())[-1][0].adapter if replies else global_adapter)"),
    ("dynamic weights are not applied: the global adapter alone (the official batched-mode bug)", "evaluation.py",
     "batch_weights = mix(lams[idx].repeat_interleave(dec.num_beams), to)",
     "batch_weights = {\"global\": 1.0}"),
    ("evaluation loads client 0's local adapter for every client", 'evaluation.py',
     'phase["global"], phase["locals"][k]))',
     'phase["global"], phase["locals"][0]))'),
    ('the -fixed rows use the global adapter alone', 'evaluation.py',
     'weights = mix(recipe.local_weight) if key[0] == "fixed"',
     'weights = {"global": 1.0} if key[0] == "fixed"'),
    ("FedDPA-F starts from the initial adapter instead of FedIT's result", 'feddpa.py',
     'start = trained[spec.starts_from]["global"] if spec.starts_from else init',
     'start = init'),
    ("FedAvg weights are not normalised", "fed.py", "    w = w / w.sum()\n", ""),
    ("A and B are averaged as a product instead of separately", "fed.py",
     "    return {k: sum(wi * u.adapter[k].double() for wi, u in zip(w, updates)).to(updates[0].adapter[k].dtype)",
     PRODUCT_AVERAGE),
    ("P and TTP are swapped", "evaluation.py",
     "return {\"P\": sum(p) / len(p) if p else None, \"TTP\": sum(ttp) / len(ttp)}",
     "return {\"P\": sum(ttp) / len(ttp), \"TTP\": sum(p) / len(p) if p else None}"),
    ("the frozen adapter receives gradients", "lora.py",
     "layer.lora_A[n].weight.requires_grad_(n == name)\n            layer.lora_B[n].weight.requires_grad_(n == name)",
     "layer.lora_A[n].weight.requires_grad_(name is not None)\n            layer.lora_B[n].weight.requires_grad_(name is not None)"),
    ("lambda is not clamped", "feddpa.py",
     "return (scale * sim.mean(-1)).clamp(0.0, 1.0)", "return scale * sim.mean(-1)"),
    ("the local adapter is sent to the server", "feddpa.py",
     "update, _, gm = global_step(round_, client, global_adapter)\n        return update, local,",
     "update, _, gm = global_step(round_, client, global_adapter)\n        update = Update(local, update.n_examples)\n        return update, local,"),
    ("lambda is held constant", "evaluation.py",
     "(idx, weight.lam(r)) for idx, r in reps]", "(idx, torch.full((len(idx),), 0.25)) for idx, r in reps]"),
    ("no gradient clipping", "fed.py",
     "            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)\n", "            pass\n"),
    ("FedDPA-T's local adapters all start from one shared initial adapter", "feddpa.py",
     "else fresh_local(model, seed, client.id)\n", "else fresh_local(model, seed, 0)\n"),
    ("FedDPA-F fine-tunes ten rounds' worth by default", "train.py",
     "finetune_rounds: float = opt(1.0,", "finetune_rounds: float = opt(10.0,"),
    ('Local is not sampled as FedIT is', 'feddpa.py',
     'return recipe.rounds, recipe.fraction, recipe.train',
     'return recipe.rounds, recipe.fraction if spec.sends else 1.0, recipe.train'),
    ('a client that never trained a local adapter is scored with the initial one mixed in', 'evaluation.py',
     '    has_local = client.local_adapter is not None\n',
     '    has_local = True\n    client = __import__("dataclasses").replace(client, local_adapter=client.local_adapter if client.local_adapter is not None else __import__("feddpa").fresh_local(ev.model, ev.recipe.seed, client.id))\n'),
    ("the response is encoded alone, not in the joint encoding", "data.py",
     "    if ids[:len(prompt)] != prompt:\n", "    if True:\n"),
    ('the oracle bound gives the training mix on every task', 'evaluation.py',
     'own, other = (scored("fixed") if client.task else None), scored("global")',
     'own = other = scored("fixed")'),
    ("the calibrated weight is not centred on the generic instructions", "feddpa.py",
     "c = F.normalize(r.to(self.centre.dtype) - self.centre, dim=-1)", "c = F.normalize(r.to(self.centre.dtype), dim=-1)"),
    ("the AUROC of lambda counts ties as wins", "evaluation.py",
     "+ 0.5 * (pos[:, None] == neg[None])", "+ 1.0 * (pos[:, None] == neg[None])"),
    # every setting a user can choose (tests/test_oracle.py::test_every_setting_equals_the_oracle), and
    # LoRA's scaling, initialisation and dropout, the evaluation mode, the scores
    ("FedDPA-T trains its local adapter with the mix reversed (a and 1 - a swapped)", "feddpa.py",
     "weights=mix(local_weight),", "weights=mix(1 - local_weight),"),
    ("--lambda-to is ignored: lambda always goes to the local adapter", "evaluation.py",
     "mix(lams[idx].repeat_interleave(dec.num_beams), to)", "mix(lams[idx].repeat_interleave(dec.num_beams))"),
    ("micro-batches past the second of a batch are dropped", "fed.py",
     "for i in range(0, len(batch), train.micro_batch_size)]", "for i in range(0, 2 * train.micro_batch_size, train.micro_batch_size)]"),
    ("an epoch budget rounds its step count to nearest instead of up", "fed.py",
     "max(1, math.ceil(train.epochs * len(examples) / train.batch_size))",
     "max(1, round(train.epochs * len(examples) / train.batch_size))"),
    ("uniform FedAvg weights by example count", "fed.py",
     "u.n_examples if weighting == \"count\" else 1.0", "u.n_examples"),
    ('FedDPA-T samples every client whatever the fraction', 'feddpa.py',
     'return recipe.rounds, recipe.fraction, recipe.train',
     'return recipe.rounds, recipe.fraction if spec.client_step is not feddpa_t_step else 1.0, recipe.train'),
    ("the clients of a round are fraction * n rounded down", "fed.py",
     "k = max(1, round(fraction * n))", "k = max(1, int(fraction * n))"),
    ("--finetune-rounds is ignored: FedDPA-F fine-tunes one round's worth", 'feddpa.py',
     'return 1, 1.0, scaled(recipe.train, recipe.finetune_rounds)',
     'return 1, 1.0, recipe.train'),
    ("beam search repeats lambda beam-major, not example-major", "evaluation.py",
     "mix(lams[idx].repeat_interleave(dec.num_beams), to)", "mix(lams[idx].repeat(dec.num_beams), to)"),
    ("mean pooling averages over the padding too", "model.py",
     "return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)", "return h.mean(1)"),
    ("LoRA scaling is alpha / sqrt(r) (rsLoRA), not alpha / r", "lora.py",
     "self.scaling = lora_alpha / r", "self.scaling = lora_alpha / math.sqrt(r)"),
    ("A is drawn within sqrt(3 / in), not peft's 1 / sqrt(in)", "lora.py",
     "return 1 / math.sqrt(self.base_layer.in_features)", "return math.sqrt(3 / self.base_layer.in_features)"),
    ("every client's fresh local adapter is the same draw", "feddpa.py",
     'seeded(seed, "fresh local adapter", client_id)', 'seeded(seed, "fresh local adapter")'),
    ("LoRA dropout is not applied in training", "lora.py",
     "if not self.training or self.p == 0:", "if True:"),
    ("LoRA dropout is applied at evaluation too", "lora.py",
     "if not self.training or self.p == 0:", "if self.p == 0:"),
    ("training leaves the model in training mode", "lora.py",
     "model.train(was_training)", "model.train(True)"),
    ("ROUGE-1 is scored as precision, not F1", "evaluation.py",
     "return 2 * p * r / (p + r) if p + r > 0 else 0.0", "return p"),
    ("a client without a local adapter is scored with the mix and the last client's local adapter", 'evaluation.py',
     '    has_local = client.local_adapter is not None\n',
     '    has_local = True\n    client = __import__("dataclasses").replace(client, local_adapter=client.local_adapter if client.local_adapter is not None else lora.get_adapter(ev.model, "local"))\n'),
    ("a client without a local adapter is scored with the base model", "evaluation.py",
     'if mixing == "none" or (m.phase == "local" and not has_local):',
     'if mixing == "none" or not has_local:'),
    ("FedDPA-F's global adapter alone is not recognised as FedIT's: its answers are generated again", "evaluation.py",
     'return phase and (PHASES[phase].starts_from or phase)',
     'return phase'),
    ("an answer set is shared by every client of a phase", "evaluation.py",
     'return (mixing, g, m.phase, client_id)',
     'return (mixing, g, m.phase)'),
    ("a test instance's r(x) is computed again for each of a client's dynamic rows", "evaluation.py",
     "        if reps_key not in ev.answered:\n", "        if True:\n"),
    ("the test instances' representations are shared by every client of a phase", 'evaluation.py',
     '("represented", METHODS[method].phase, client.id, recipe.pool)',
     '("represented", METHODS[method].phase, recipe.pool)'),
    ("a batch's r(x) is read for every later batch of the same instances", "evaluation.py",
     "(idx, weight.lam(r)) for idx, r in reps]", "(idx, weight.lam(reps[0][1][:len(idx)])) for idx, r in reps]"),
    ("beam search encodes the prompts with the first examples' mixes, not each example's own", "generate.py",
     "first_beams = torch.arange(0, B * k, k, device=dev)",
     "first_beams = torch.arange(B, device=dev)"),
    ("a client's dynamic rows read the local adapter left in its slot instead of loading the client's", "evaluation.py",
     'with lora.using(ev.model, given):', 'with lora.using(ev.model, {"global": given["global"]}):'),
    # the paper's experiments (tests/test_paper.py): similarity metrics, the sum row, task subsets, curves, re-scoring
    ("the L2 similarity reads unit vectors (so it only re-ranks the cosine)", "feddpa.py",
     "return 1 - (a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1)).clamp_min(torch.finfo(a.dtype).tiny)",
     "return 1 - (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).norm(dim=-1) / 2"),
    ("Pearson's r is the cosine of the uncentred vectors", "feddpa.py",
     "F.cosine_similarity(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), dim=-1)",
     "F.cosine_similarity(a, b, dim=-1)"),
    ("--similarity is ignored: the paper's weight always takes the cosine", "feddpa.py",
     "dynamic_lambda(r, self.ref_reps, self.scale, kind=self.similarity)", "dynamic_lambda(r, self.ref_reps, self.scale)"),
    ("the sum row weighs the local adapter by 0.5", "evaluation.py",
     '"sum": (("global", "local"), {"global": 1.0, "local": 1.0})', '"sum": (("global", "local"), {"global": 1.0, "local": 0.5})'),
    ("--tasks renumbers the clients it keeps (a subset's client gets another's seeds)", "data.py",
     "fed.notes, [fed.client_ids[k] for k in keep])", "fed.notes)"),
    ("--tasks keeps every task's tests", "data.py",
     "tests = {t: recs for t, recs in fed.tests.items() if t in tasks}", "tests = dict(fed.tests)"),
    ("the curve's instances are each task's first M, not a seeded draw", "train.py",
     'torch.randperm(len(recs), generator=fed.seeded(cfg.seed, "curve", task))', "torch.arange(len(recs))"),
    ("a curve point scores the phase's starting adapter, not the round's", "train.py",
     "name: feddpa.phase_result(name, federation.global_adapter, phase.clients",
     "name: feddpa.phase_result(name, phase.start or federation.global_adapter, phase.clients"),
    ("a resumed run's curve starts again", "train.py",
     'state.setdefault("curves", {})  # nor one', 'state["curves"] = {}  # nor one'),
    ("FedDPA-F's curve point is numbered 1, not after FedIT's rounds", "train.py",
     'rounds = federation.round + (len(state["trained"][before]["history"]) if before else 0)', "rounds = federation.round"),
    ("a curve point draws from a client's generator (training then goes on otherwise)", "train.py",
     "        one = replace(ev, answered={}, losses=True)\n",
     "        one = replace(ev, answered={}, losses=True)\n        torch.rand(1, generator=phase.clients[0].generator)\n"),
    ("re-scoring ignores the inference flags given", "train.py",
     "return replace(run, **{name: getattr(cfg, name) for name in args.given if name in INFERENCE},",
     "return replace(run, **{},"),
    ("re-scoring accepts a training flag", "train.py", "if cfg.rescore and training:", "if cfg.rescore and training and False:"),
    ("a re-scored study reads seed 0's adapters for every seed", "train.py",
     'rescore = os.path.join(cfg.rescore, f"seed{seed}") if cfg.rescore else ""',
     'rescore = os.path.join(cfg.rescore, "seed0") if cfg.rescore else ""'),
    ("a held-out loss is divided by the batch's answer tokens, not the instance's", "evaluation.py",
     "(per_row / keep.sum(1))", "(per_row / keep.sum())"),
    ("a dynamic row's held-out loss gives its instances one another's lambdas", "evaluation.py",
     "weights_now = mix(lams[idx], to)", "weights_now = mix(lams[idx].flip(0), to)"),
    ("the adapter diagnostics count the padding's tokens", "extras/diagnose.py",
     ".mean(-1)[real].sum().item()", ".mean(-1).sum().item()"),
    ("the adapter diagnostics swap own-task and other-task prompts", "extras/diagnose.py",
     '(("own", own), ("other", other))', '(("own", other), ("other", own))'),
    ("the adapter diagnostics weigh each adapter's term by its mix", "extras/diagnose.py",
     "layer.update(t, 1.0, x,", "layer.update(t, weights[t], x,"),
    ("DP noise is added to each client's update, not to their mean", "fed.py",
     "noise = torch.randn(sent[k].shape, generator=generator, dtype=torch.float64) * std",
     "noise = sum(torch.randn(sent[k].shape, generator=generator, dtype=torch.float64) * std for _ in changes) / expected"),
    ("DP clips each tensor, not the whole adapter", "fed.py",
     "return {k: scale * d for k, d in change.items()}, norm",
     "return {k: min(1.0, clip / max(float(d.norm()), 1e-30)) * d for k, d in change.items()}, norm"),
    ("DP noise is scaled by n, not 1 / n", "fed.py",
     "std = dp.noise * dp.clip / expected", "std = dp.noise * dp.clip * expected"),
    ("epsilon composes the rounds as if linearly", "fed.py",
     "s = noise / math.sqrt(rounds)", "s = noise / rounds"),
    ("the DP mean divides by the clients that replied, not those expected", "fed.py",
     "expected=expected, generator=gen)", "expected=len(updates), generator=gen)"),
    ("the Local baseline is noised as if it sent its adapter", "feddpa.py",
     '"local": PhaseSpec(local_step, sends=False)', '"local": PhaseSpec(local_step, sends=False, dp=True)'),
    ("--curve-methods is ignored: every method gets a curve", "train.py",
     "(cfg.curve_methods or cfg.methods).split", "(cfg.methods).split"),
    ("DP over Flower: the nodes send their updates unclipped", "extras/flower_app.py",
     "if sent and phase.dp is not None:", "if sent and phase.dp is not None and False:"),
    ("DP over Flower: the deployment's noise is the run's seed's, not secure randomness", "extras/flower_app.py",
     "rec = replace(rec, dp=replace(rec.dp, seeded_noise=False))", "rec = rec"),
    ("DP over Flower: the history keeps the clipped norms, not the nodes' norms before clipping", "fed.py",
     "norms = [n if u.norm is None else u.norm for u, n in zip(updates, norms)]", "norms = list(norms)"),
    ("--curve-methods accepts a method the run does not train", "train.py",
     'if cfg.curve_methods and m not in cfg.methods.split(",")]', 'if cfg.curve_methods and m not in feddpa.METHODS]'),
    ("--dp-noise without --dp-clip is accepted (noise of scale 0)", "train.py",
     "(cfg.dp_noise > 0 and cfg.dp_clip == 0,", "(False,"),
    ("extras.diagnose on a folder without a run ends in a traceback", "extras/diagnose.py",
     "except (OSError, KeyError, ValueError, runs.UserError,", "except (OSError, KeyError, ValueError,"),
    ("extras.plot says it drew the adapter-RMS figure but does not", "extras/plot.py",
     'rms_figure(plt, diagnostics, os.path.join(d, "rms.png"))', "diagnostics"),
    ("the curve figure drops its held-out loss rows", "extras/plot.py",
     'rows = (("P", "TTP"), ("P_loss", "TTP_loss")) if losses else (("P", "TTP"),)', 'rows = (("P", "TTP"),)'),
    ("DP-FedAvg weighs the clipped updates by their clients' example counts", "fed.py",
     "mean = sum(c[k] for c in changes) / expected",
     "mean = sum(u.n_examples * c[k] for u, c in zip(updates, changes)) / sum(u.n_examples for u in updates)"),
    ("DP clips FedDPA-T's local adapter's update too", "feddpa.py",
     "        update, _, gm = global_step(round_, client, global_adapter)\n",
     "        if recipe.dp:\n            local = {k: (start[k].double() + d).to(start[k].dtype) "
     "for k, d in __import__(\"fed\").clipped(local, start, recipe.dp.clip)[0].items()}\n"
     "        update, _, gm = global_step(round_, client, global_adapter)\n"),
    ("DP noise: one generator for the phase, not one per round (a resumed run draws other noise)", "fed.py",
     "    def aggregate(updates, sent, *, round_, expected):\n        if dp is None:\n            return fedavg(updates, weighting), {}\n"
     "        gen = (seeded(seed, *stream, \"dp noise\", round_) if dp.seeded_noise",
     "    shared = seeded(seed, *stream, \"dp noise\")\n\n"
     "    def aggregate(updates, sent, *, round_, expected):\n        if dp is None:\n            return fedavg(updates, weighting), {}\n"
     "        gen = (shared if dp.seeded_noise"),
    ("tools/ablations.py subtracts the re-scored study from the base, not the base from it", "tools/ablations.py",
     "for seeds in (study, base)]", "for seeds in (base, study)]"),
    ("tools/ablations.py names as the ablation every setting that differs, --methods too", "tools/ablations.py",
     "if k not in NOT_THE_ABLATION and", "if k not in table.FREE and"),
]


def copy_repo(dest: Path):
    shutil.copytree(ROOT, dest / ROOT.name, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache",
                                                                          ".hypothesis"))
    if (ROOT.parent / "shared").exists():  # the real data and model the tests read, where this machine has them
        os.symlink(ROOT.parent / "shared", dest / "shared")
    return dest / ROOT.name


def run_tests(repo: Path, first_failure: bool, tests=TESTS) -> tuple:
    """(passed, the first failing test or the error's last line, seconds)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if first_failure else []),
                        *tests], cwd=repo, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    why = failed[0] if failed else (r.stdout.strip().splitlines() or ["no output"])[-1]
    return r.returncode == 0, why, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated fault numbers (see --list)")
    ap.add_argument("--list", action="store_true", help="list the faults and exit")
    ap.add_argument("--tests", help="comma-separated test files or ids to run instead of TESTS (a quick check)")
    args = ap.parse_args(argv)
    chosen = [int(i) for i in args.only.split(",")] if args.only else list(range(1, len(MUTANTS) + 1))
    if args.list:
        for i, (name, path, _, _) in enumerate(MUTANTS, 1):
            print(f"{i:2d}  {path:<10} {name}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp))
        tests = args.tests.split(",") if args.tests else TESTS
        ok, why, secs = run_tests(repo, first_failure=False, tests=tests)
        print(f" 0  no fault planted: {'the tests pass' if ok else 'FAILED ' + why} ({secs:.0f}s)", flush=True)
        if not ok:
            return 1
        survived = []
        for i in chosen:
            name, path, old, new = MUTANTS[i - 1]
            original = (repo / path).read_text()
            if original.count(old) != 1:
                print(f"{i:2d}  {name}: the text to replace occurs {original.count(old)} times in {path}; update this script")
                survived.append(i)
                continue
            (repo / path).write_text(original.replace(old, new))
            try:
                ok, why, secs = run_tests(repo, first_failure=True, tests=tests)
            finally:
                (repo / path).write_text(original)
            print(f"{i:2d}  {name}: {'SURVIVED' if ok else 'caught by ' + why} ({secs:.0f}s)", flush=True)
            if ok:
                survived.append(i)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} faults caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
