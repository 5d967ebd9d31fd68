"""export.py: our adapters as PEFT folders that peft loads to the same logits, a fixed mix merged into a
plain model that transformers loads, PEFT folders read back (checked by name and shape), and the command
on a finished run."""
import json

import pytest
import torch

from extras import export
import hf
import lora
import train
from conftest import hf_tiny, left_padded, smollm2_dir, write_three_clients

SETTINGS = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def ours_with_random_adapters(d):
    model = lora.inject(hf.from_pretrained(d), SETTINGS["target_modules"], r=4, lora_alpha=8, dropout=0.0).eval()
    g = torch.Generator().manual_seed(5)
    for _, layer in lora.lora_layers(model):
        for name in lora.ADAPTERS:
            layer.lora_B[name].weight.data.normal_(0, 0.05, generator=g)
    return model


def logits(model, ids, mask, hf_model=False):
    with torch.no_grad():
        if hf_model:
            return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        return model(ids, mask)[0]


def models(tmp_path, which):
    if which == "tiny":
        hf_tiny(tmp_path / "base")
        return str(tmp_path / "base"), left_padded(96)
    d = smollm2_dir()
    return d, left_padded(49152)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_peft_folders_give_our_logits_in_peft(tmp_path, which):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    base, (ids, mask) = models(tmp_path, which)
    ours = ours_with_random_adapters(base)
    for name in lora.ADAPTERS:
        export.write_peft(lora.get_adapter(ours, name), str(tmp_path / name), base, SETTINGS)
        theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), str(tmp_path / name)).eval()
        with lora.mixed(ours, {name: 1.0}):
            diff = (logits(ours, ids, mask) - logits(theirs, ids, mask, True))[mask.bool()].abs().max()
        assert diff <= 1e-5, (name, diff)


def test_a_fixed_mix_merged_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    base, (ids, mask) = models(tmp_path, "tiny")
    ours = ours_with_random_adapters(base)
    mix = {"local": 0.3, "global": 0.7}
    hf.save_pretrained(export.merged_model(ours, mix), str(tmp_path / "merged"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with lora.mixed(ours, mix):
        assert (logits(ours, ids, mask) - logits(theirs, ids, mask, True))[mask.bool()].abs().max() <= 1e-4


def test_peft_folders_read_back_and_mismatches_are_named(tmp_path):
    from peft import LoraConfig, get_peft_model
    theirs = get_peft_model(hf_tiny(tmp_path / "base"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["q_proj", "v_proj"]))
    for p in theirs.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = ours_with_random_adapters(str(tmp_path / "base"))
    state = hf.read_peft(str(tmp_path / "peft"), lora.adapter_tensors(ours, "global"))
    want = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
    small = get_peft_model(hf_tiny(tmp_path / "b2"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    small.save_pretrained(tmp_path / "r2")
    with pytest.raises(hf.CheckpointError, match=r"adapter_model.safetensors: adapter tensor model.layers.0.self_attn"
                                                 r".q_proj.lora_A.weight has shape \(2, 64\), the model expects \(4, 64\)"):
        hf.read_peft(str(tmp_path / "r2"), lora.adapter_tensors(ours, "global"))


def test_export_command_and_init_adapter_on_a_finished_run(tiny_dir, tmp_path, capsys):
    write_three_clients(tmp_path / "data", n_train=20, n_test=2)
    args = ["--data", str(tmp_path / "data"), "--model", str(tiny_dir), "--rounds", "2", "--local-steps", "1",
            "--batch-size", "4", "--micro-batch-size", "4", "--test-per-task", "1", "--max-new-tokens", "2",
            "--targets", "q_proj,v_proj", "--lora-r", "4", "--methods", "fedit,feddpa-t", "-q"]
    train.main([*args, "--out", str(tmp_path / "run")])
    assert export.main([str(tmp_path / "run"), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "feddpa-t" / "client1_local" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_dir)
    assert export.main([str(tmp_path / "run"), str(tmp_path / "merged"), "--merge", "feddpa-t", "--client", "1"]) == 0
    # the merged model computes what the run's model computes with client 1's adapters at the training mix
    merged = hf.from_pretrained(str(tmp_path / "merged")).eval()
    ours = lora.inject(hf.from_pretrained(str(tiny_dir)), ["q_proj", "v_proj"], r=4, dropout=0.0).eval()
    lora.load_adapter(ours, "global", hf.read_safetensors(str(tmp_path / "run" / "adapters" / "feddpa-t" / "global.safetensors")))
    lora.load_adapter(ours, "local", hf.read_safetensors(str(tmp_path / "run" / "adapters" / "feddpa-t" / "client1_local.safetensors")))
    ids, mask = left_padded(merged.config.vocab_size)
    with torch.no_grad(), lora.mixed(ours, {"local": 0.5, "global": 0.5}):
        want = ours(ids, mask)[0]
        got = merged(ids, mask)[0]
    with torch.no_grad():
        plain = ours(ids, mask)[0]  # outside the mix: the base alone
    assert (got - want)[mask.bool()].abs().max() < 1e-4 < (plain - want)[mask.bool()].abs().max()
    train.main([*args, "--out", str(tmp_path / "again"), "--init-adapter", str(tmp_path / "peft" / "fedit" / "global")])
    init = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=True)["init"]
    fedit = hf.read_safetensors(str(tmp_path / "run" / "adapters" / "fedit" / "global.safetensors"))
    assert all(torch.equal(init[k], fedit[k]) for k in fedit)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an adapter of another rank: one line, its config's r and the run's
        train.main([*args, "--lora-r", "8", "--out", str(tmp_path / "bad"), "--init-adapter", str(tmp_path / "peft" / "fedit" / "global")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "adapter_config.json: r is 4, this run's --lora-r is 8" in err
    assert not (tmp_path / "bad").exists()


INIT_ARGS = ["--model", "MODEL", "--data", "DATA", "--targets", "q_proj,v_proj", "--lora-r", "4",  # --lora-alpha 16
             "--rounds", "1", "--local-steps", "1", "--test-per-task", "1", "--max-new-tokens", "2", "--methods", "fedit", "-q"]
PEFT_CONFIGS = {  # adapter_config.json as peft writes it, with these settings -> what the one line says
    "another lora_alpha": ({"lora_alpha": 32}, "lora_alpha is 32, this run's --lora-alpha is 16.0"),
    "another r": ({"r": 8}, "r is 8, this run's --lora-r is 4"),
    "rsLoRA": ({"use_rslora": True}, "use_rslora is true; this program's LoRA has no rsLoRA"),
    "DoRA": ({"use_dora": True}, "use_dora is true; this program's LoRA has no DoRA"),
    "other targets": ({"target_modules": ["q_proj", "k_proj"]},
                      "target_modules is [\"k_proj\", \"q_proj\"], this run's --targets is q_proj,v_proj"),
    "all linear layers": ({"target_modules": "all-linear"}, "target_modules is \"all-linear\", this run's --targets"),
    "per-layer alpha": ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern is {\"q_proj\": 32}; this run's --lora-alpha is 16.0"),
    "no adapter_config.json": (None, "no such file; without it the adapter's r, lora_alpha and target modules are unknown"),
}


@pytest.mark.parametrize("case", PEFT_CONFIGS)
def test_init_adapter_of_other_lora_settings_is_refused_naming_the_file_and_both_values(case, tiny_dir, tmp_path, capsys):
    """--init-adapter DIR: an adapter whose adapter_config.json gives its tensors another meaning than this
    run's adapters (another scaling, rsLoRA, DoRA, other layers; or no config at all, so the scaling is
    unknown) is refused in one line naming the file and both values, before anything is written (with
    --seeds too); one that peft wrote with this run's settings passes, as export.py's folders do (the
    test above runs one)."""
    from peft import LoraConfig
    changes, piece = PEFT_CONFIGS[case]
    write_three_clients(tmp_path / "data", n_train=20, n_test=2)
    model = lora.inject(hf.from_pretrained(str(tiny_dir)), ["q_proj", "v_proj"], r=4, lora_alpha=16)
    d = tmp_path / "adapter"
    export.write_peft(lora.get_adapter(model, "global"), str(d), str(tiny_dir),
                      export.lora_settings(vars(train.Config(lora_r=4, targets="q_proj,v_proj"))))
    hf.check_peft_config(str(d), 4, 16.0, ["q_proj", "v_proj"])  # what export.py writes
    (d / "adapter_config.json").unlink()
    settings = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    LoraConfig(**settings).save_pretrained(str(d))
    hf.check_peft_config(str(d), 4, 16.0, ["v_proj", "q_proj"])  # what peft writes, with this run's settings
    if changes is None:
        (d / "adapter_config.json").unlink()
    else:
        LoraConfig(**{**settings, **changes}).save_pretrained(str(d))
    args = [str(tiny_dir) if a == "MODEL" else str(tmp_path / "data") if a == "DATA" else a for a in INIT_ARGS]
    for extra in ([], ["--seeds", "0,1"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train.main([*args, *extra, "--init-adapter", str(d), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {d / 'adapter_config.json'}: {piece}"), err
        assert not (tmp_path / "out").exists()
