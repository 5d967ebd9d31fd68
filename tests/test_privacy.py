"""Client-level DP-FedAvg on the global adapter (fed.dp_fedavg, fed.dp_epsilon, --dp-clip/--dp-noise):
the clipping, the noise's scale, the guarantee against Google's dp-accounting, DP off and sigma = 0 against
FedAvg, the local adapter untouched by DP, an exact resume, and the flags' refusals."""
import json
import math

import pytest
import torch

import fed
import feddpa
import train


def adapter(gen, scale=1.0, shapes=((4, 6), (6, 4), (4, 6), (6, 4))):
    return {f"t{i}": scale * torch.randn(s, generator=gen) for i, s in enumerate(shapes)}


def norm(d: dict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


# ----------------------------------------------------------------------------------------------
# The server step

def test_an_update_above_the_clip_is_scaled_to_it_over_the_whole_adapter_and_one_below_is_untouched():
    g = torch.Generator().manual_seed(0)
    sent = adapter(g)
    for scale, clip in ((3.0, 1.0), (0.1, 1.0)):
        change = adapter(g, scale)
        got, norms = fed.dp_fedavg([fed.Update({k: sent[k] + change[k] for k in sent}, 5)], sent, fed.DP(clip, 0.0),
                                   expected=1, generator=torch.Generator())
        moved = {k: got[k].double() - sent[k].double() for k in sent}
        assert norms == [pytest.approx(norm({k: (sent[k] + change[k]).double() - sent[k].double() for k in sent}))]
        if norms[0] > clip:
            assert norm(moved) == pytest.approx(clip, rel=1e-6)
            # one factor for all tensors: each moves in its own direction, scaled alike
            factors = [float(moved[k].norm() / change[k].double().norm()) for k in sent]
            assert max(factors) == pytest.approx(min(factors), rel=1e-5) and factors[0] == pytest.approx(clip / norms[0], rel=1e-5)
        else:
            assert all(torch.equal(got[k], sent[k] + change[k]) for k in sent)


def test_the_noise_has_std_sigma_clip_over_n():
    """Updates equal to the adapter sent (no change): what the server adds is the noise alone. Its sample
    std over N = 200,000 coordinates is within 5 standard errors (sigma / sqrt(2N)) of sigma C / n: a
    false alarm about once in 1.7 million runs (two-sided normal tail at 5); the same seed each run."""
    g = torch.Generator().manual_seed(1)
    sent = adapter(g, shapes=((100, 1000), (1000, 100)))
    n, dp = 8, fed.DP(clip=0.7, noise=1.3)
    updates = [fed.Update(dict(sent), 10) for _ in range(n)]
    got, _ = fed.dp_fedavg(updates, sent, dp, expected=n, generator=torch.Generator().manual_seed(2))
    noise = torch.cat([(got[k].double() - sent[k].double()).flatten() for k in sent])
    want = dp.noise * dp.clip / n
    assert abs(noise.std().item() / want - 1) < 5 / math.sqrt(2 * noise.numel())
    assert abs(noise.mean().item()) < 5 * want / math.sqrt(noise.numel())


def test_sigma_zero_and_a_clip_above_every_update_is_fedavg_with_equal_weights():
    g = torch.Generator().manual_seed(3)
    sent = adapter(g)
    updates = [fed.Update({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sent.items()}, 10 + i) for i in range(5)]
    got, norms = fed.dp_fedavg(updates, sent, fed.DP(clip=100.0, noise=0.0), expected=5, generator=torch.Generator())
    want = fed.fedavg(updates, "uniform")
    assert max(norms) < 100
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in sent)


def test_dp_off_is_fedavg_exactly():
    g = torch.Generator().manual_seed(4)
    sent = adapter(g)
    updates = [fed.Update(adapter(g), 10 + i) for i in range(4)]
    for weighting in ("count", "uniform"):
        got, server = fed.averaging(weighting)(updates, sent, round_=0, expected=4)
        want = fed.fedavg(updates, weighting)
        assert server == {} and all(torch.equal(got[k], want[k]) for k in want)


def test_seeded_noise_replays_and_secure_noise_does_not():
    """A simulation's noise is the seed's (a resumed round draws it again); a deployment's (DP.seeded_noise False)
    comes from the OS's secure randomness: two draws differ."""
    g = torch.Generator().manual_seed(6)
    sent = adapter(g)
    ups = [fed.Update(dict(sent), 1)] * 2
    draws = {s: [fed.averaging(dp=fed.DP(1.0, 1.0, seeded_noise=s), seed=0, stream=("fedit",))(ups, sent, round_=3, expected=2)[0]["t0"]
                 for _ in range(2)] for s in (True, False)}
    assert torch.equal(*draws[True]) and not torch.equal(*draws[False])
    other = fed.averaging(dp=fed.DP(1.0, 1.0), seed=0, stream=("fedit",))(ups, sent, round_=4, expected=2)[0]["t0"]
    assert not torch.equal(draws[True][0], other)  # each round its own draw


def test_the_mean_divides_by_the_clients_expected_not_those_that_replied():
    """Over a network some chosen clients may not answer: the sum is divided by the number expected, so
    that the noise's scale and one client's bound on the mean hold whoever replies."""
    g = torch.Generator().manual_seed(5)
    sent = adapter(g)
    change = adapter(g, 0.01)
    up = fed.Update({k: sent[k] + change[k] for k in sent}, 1)
    got, server = fed.averaging(dp=fed.DP(clip=10.0, noise=0.0))([up, up], sent, round_=0, expected=4)  # 2 of 4 replied
    assert server["update_norms"] == [pytest.approx(norm(change), rel=1e-5)] * 2 and server["epsilon"] is None
    assert all(torch.allclose(got[k].double() - sent[k].double(), change[k].double() / 2, atol=1e-7) for k in sent)


# ----------------------------------------------------------------------------------------------
# The guarantee

@pytest.mark.parametrize("noise", [0.7, 1.0, 2.0, 5.0])
def test_epsilon_agrees_with_dp_accountings_pld_accountant(noise):
    """R Gaussian mechanisms of multiplier sigma: our closed form (fed.dp_epsilon) against the privacy
    loss distribution accountant of Google's dp-accounting, which is tight, within 1%."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    for rounds in (1, 10, 50):
        for delta in (1e-5, 1e-3):
            acc = pld_privacy_accountant.PLDAccountant()
            acc.compose(dp_accounting.GaussianDpEvent(noise), rounds)
            assert fed.dp_epsilon(noise, rounds, delta) == pytest.approx(acc.get_epsilon(delta), rel=0.01), (rounds, delta)
    assert fed.dp_epsilon(0.0, 10, 1e-5) == math.inf


# ----------------------------------------------------------------------------------------------
# Runs with DP

DP_RUN = ["--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--test-per-task", "2",
          "--max-new-tokens", "4", "--methods", "local,fedit,feddpa-t,centralized", "--dtype", "float64", "-q"]


@pytest.fixture(scope="module")
def dp_run(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    model, data_dir, _ = tiny_run
    args = ["--model", str(model), "--data", str(data_dir), *DP_RUN]
    train.main([*args, "--dp-clip", "0.05", "--dp-noise", "0.5", "--out", str(d / "dp")])
    return d, args


def test_a_dp_run_reports_epsilon_for_the_phases_that_send(dp_run):
    d, _ = dp_run
    res = json.loads((d / "dp" / "results.json").read_text())
    assert res["config"]["weighting"] == "uniform"
    for phase in ("fedit", "feddpa-t"):
        t = res["training"][phase]
        assert t["epsilon"] == pytest.approx(fed.dp_epsilon(0.5, 3, 1e-5)) and t["delta"] == 1e-5
        assert [h["epsilon"] for h in t["history"]] == [pytest.approx(fed.dp_epsilon(0.5, r, 1e-5)) for r in (1, 2, 3)]
        assert all(len(h["update_norms"]) == 3 for h in t["history"])
        assert any(n > 0.05 for h in t["history"] for n in h["update_norms"])  # the clip bites
    for phase in ("local", "centralized"):
        assert "epsilon" not in res["training"][phase]


def test_the_local_adapter_is_untouched_by_dp_given_the_same_global_adapters(tiny):
    """FedDPA-T with DP, each round's global adapter recorded; then without DP, its server replaying those
    adapters round by round: every client's local adapter is bit-identical (DP acts on the global adapter
    only, at the server), and the DP run's global adapters are not FedAvg's (the check has teeth)."""
    import data
    m, tok, world = tiny
    encoded = dict(enumerate(data.encode_clients(world.clients[:3], tok, 128)))
    train_ = fed.LocalTrain(lr=5e-3, max_steps=2, batch_size=4, micro_batch_size=4)
    init = {k: v.clone() for k, v in __import__("lora").get_adapter(m, "global").items()}
    runs = {}
    for name, dp in (("dp", fed.DP(clip=0.05, noise=0.5)), ("replayed", None)):
        recipe = feddpa.Recipe(train=train_, rounds=3, dp=dp, weighting="uniform")
        phase = feddpa.setup_phase("feddpa-t", m, pad_id=tok.pad_id, recipe=recipe, datasets=encoded, init=init, trained={})
        assert (phase.dp is None) == (dp is None)
        if dp is not None:
            sent = []
            federation = feddpa.run_phase("feddpa-t", phase, on_round_end=lambda f: sent.append(f.global_adapter))
        else:
            plain = []

            def replay(updates, prev, *, round_, expected):
                plain.append(fed.fedavg(updates, "uniform"))
                return sent[round_], {}
            federation = fed.run_rounds(fed.Federation(phase.start, len(phase.clients)),
                                        fed.in_process(phase.clients, phase.step), rounds=3, aggregate=replay)
        runs[name] = [c.local for c in phase.clients]
        assert len(federation.history) == 3
    for a, b in zip(runs["dp"], runs["replayed"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.allclose(sent[r][k], plain[r][k], atol=1e-4) for r in range(3) for k in sent[r] if "lora_B" in k)


def test_a_dp_run_killed_and_resumed_is_the_uninterrupted_run(tiny_run, tmp_path):
    """SIGKILL right after FedIT's second round is checkpointed, then --resume: results and adapters
    identical to a run never stopped (each round's noise has its own generator, keyed by the round)."""
    from test_runs import straight_and_killed_after_fedit_round_2
    straight, killed = straight_and_killed_after_fedit_round_2([*tiny_run[2], "--dp-clip", "0.05", "--dp-noise", "0.5"],
                                                               tmp_path)
    assert killed[0]["training"]["fedit"]["epsilon"] > 0
    assert killed == straight


@pytest.mark.parametrize("flags, message", [
    (["--dp-noise", "1.0"], "--dp-noise 1.0 needs --dp-clip > 0"),
    (["--dp-clip", "0.5", "--weighting", "count"], "--weighting count weighs clients by their data; DP-FedAvg"),
    (["--dp-clip", "0.5", "--dp-delta", "1.5"], "--dp-delta 1.5 must be in (0, 1)"),
    (["--dp-clip", "-1"], "--dp-clip and --dp-noise must be >= 0"),
])
def test_dp_flags_are_checked_in_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()
    cfg, _ = train.parse_args(["--dp-clip", "0.5", "--weighting", "uniform"])
    assert cfg.weighting == "uniform" and train.recipe(cfg).dp == fed.DP(0.5, 0.0, 1e-5)
