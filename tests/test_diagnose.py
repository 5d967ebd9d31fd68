"""extras.diagnose: each adapter's output RMS per layer, against the first layer's worked out by hand, and
extras.plot's figure of it; a one-line error on a folder without a run."""
import json
import math

import pytest
import torch

import data
import hf
import lora
import train


@pytest.fixture(scope="module")
def diagnosed(tiny_run, tmp_path_factory):
    from extras import diagnose
    _, _, args = tiny_run
    out = tmp_path_factory.mktemp("diagnose") / "study"
    train.main([*args, "--dtype", "float64", "--seeds", "0,1", "--out", str(out), "-q"])
    assert diagnose.main([str(out), "--per-task", "3"]) == 0
    return out


def by_hand(model, tok, records, adapter: dict, cutoff: int):
    """RMS of the first LoRA layer's (layer 0's q_proj) terms, each prompt alone (no padding): its input is
    the first block's input norm of the embeddings; the adapter's term (lora_alpha / r) B A x, the base's W x."""
    path, layer = lora.lora_layers(model)[0]
    assert path == "model.layers.0.self_attn.q_proj"
    sq = {"global": 0.0, "local": 0.0, "base": 0.0}
    n = 0
    for r in records:
        ids = torch.tensor([data.encode_prompt(tok, r, cutoff)])
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0]          # (T, dim)
        for name in ("global", "local"):
            A, B = (adapter[name][f"{path}.lora_{ab}.weight"] for ab in "AB")
            sq[name] += ((x @ A.T @ B.T * layer.scaling) ** 2).sum().item()
        sq["base"] += ((x @ layer.base_layer.weight.T) ** 2).sum().item()
        n += x.shape[0] * layer.base_layer.out_features
    return {k: math.sqrt(v / n) for k, v in sq.items()}


def test_the_first_layers_rms_is_the_hand_computed_one(diagnosed):
    res = json.loads((diagnosed / "diagnostics.json").read_text())
    assert list(res["per_seed"]) == ["0", "1"] and res["phase"] == "feddpa-t"
    for seed in (0, 1):
        run = diagnosed / f"seed{seed}"
        cfg = train.resumed_config(train.Config(), str(run))
        fd = train.load_data(cfg.data, cfg.seed, 0, 0.5, 10, 0)
        model_dir, tok = train.base_and_tokenizer(cfg, torch.device("cpu"), False)
        model = train.load_model(cfg, model_dir, torch.device("cpu"))
        g = hf.read_safetensors(str(run / "adapters" / "feddpa-t" / "global.safetensors"))
        want = {f"{t}_{w}": 0.0 for t in ("global", "local", "base") for w in ("own", "other")}
        for cid, task in zip(fd.client_ids, fd.client_tasks):
            adapters = {"global": g, "local": hf.read_safetensors(str(run / "adapters" / "feddpa-t" / f"client{cid}_local.safetensors"))}
            for where, recs in (("own", fd.tests[task][:3]), ("other", [r for t, rs in fd.tests.items() if t != task for r in rs[:3]])):
                for t, v in by_hand(model, tok, recs, adapters, cfg.cutoff).items():
                    want[f"{t}_{where}"] += v / len(fd.client_ids)
        got = res["per_seed"][str(seed)]
        assert got["clients"] == 3
        for k, v in want.items():
            assert got[k][0] == pytest.approx(v, rel=1e-9), (seed, k)
        assert got["local_own"][0] != got["local_other"][0] and got["global_own"][0] > 0  # teeth
    assert res["layers"] == [p for p, _ in lora.lora_layers(model)] and len(res["per_seed"]["0"]["global_own"]) == len(res["layers"])


def test_plot_draws_the_diagnostics(diagnosed):
    import matplotlib.image
    from extras import plot
    assert plot.main([str(diagnosed)]) == 0
    image = matplotlib.image.imread(diagnosed / "figures" / "rms.png")
    assert image.shape[:2] == (400, 1200) and image[..., :3].std() > 0.05


def test_diagnose_without_a_run_is_one_line(tmp_path, capsys):
    from extras import diagnose
    assert diagnose.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err
