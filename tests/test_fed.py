"""fed.py: FedAvg, what crosses the client/server boundary in the round loop, and the loss a round records
under gradient accumulation."""
import pytest
import torch
import torch.nn.functional as F

import data
import fed
import feddpa
import hf
import lora
from conftest import small_fed


def random_state(seed, shapes=(("a.lora_A.weight", (4, 8)), ("a.lora_B.weight", (8, 4)))):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes}


def test_fedavg_is_the_weighted_mean_and_identity_on_equal_states():
    states, counts = [random_state(s) for s in range(3)], [10, 30, 60]
    avg = fed.fedavg([fed.Update(s, n) for s, n in zip(states, counts)])
    for k in avg:
        want = sum(n / 100 * s[k] for s, n in zip(states, counts))
        assert torch.allclose(avg[k], want, atol=1e-6)
    uni = fed.fedavg([fed.Update(s, n) for s, n in zip(states, counts)], weighting="uniform")
    assert all(torch.allclose(uni[k], sum(s[k] for s in states) / 3, atol=1e-6) for k in uni)
    same = fed.fedavg([fed.Update(states[0], n) for n in counts])
    assert all(torch.equal(same[k], states[0][k]) for k in same)


def test_run_rounds_messages_carry_only_the_global_adapter(tiny):
    m, tok, world = tiny
    train = fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=4)
    init = lora.get_adapter(m, "global")
    clients = [fed.Client(i, [data.encode_example(tok, r) for r in recs], torch.Generator().manual_seed(i))
               for i, recs in enumerate(world.clients[:3])]
    sent = []
    step = feddpa.feddpa_t_step(m, tok.pad_id, train, recipe=feddpa.Recipe(local_weight=0.5, seed=0))

    def recording(r, c, g):
        update, local, metrics = step(r, c, g)
        # what is sent is a trained global adapter, not the client's local one
        assert not any(torch.equal(update.adapter[k], g[k]) for k in update.adapter if "lora_B" in k)
        if local is not None:
            assert not any(torch.equal(update.adapter[k], local[k]) for k in update.adapter if "lora_B" in k)
        sent.append((c, update))
        return update, local, metrics
    federation = fed.run_rounds(fed.Federation(init, len(clients)), fed.in_process(clients, recording), rounds=2,
                                sample=lambda n, r: fed.sample_clients(n, 2 / 3, seed=0, round_=r))
    assert len(federation.history) == 2 and all(len(h["clients"]) == 2 for h in federation.history)
    for c, update in sent:
        assert set(update.adapter) == set(init)
        if c.local is not None:
            assert all(update.adapter[k] is not c.local[k] for k in update.adapter)
    assert federation.history[0]["bytes_up"] == 2 * fed.nbytes(init)


def test_a_round_records_the_mean_over_micro_batches_of_each_micro_batch_s_token_mean(tiny_dir):
    """The loss train_adapter returns (a round's "loss") under gradient accumulation, against a plain
    loop: with max_steps 1 it is the loss of the one step, at the initial weights (before the update, so
    lr plays no part), and the step's loss (whose gradient the step takes) is the mean over its
    micro-batches of each micro-batch's per-token mean cross-entropy, not the per-token mean over the
    whole batch. That is what transformers' Trainer did before v4.46, and still does for a model that
    takes no loss kwargs; from v4.46 a Trainer model that takes them is given the labelled-token count
    of the whole accumulated batch, and its loss is the per-token mean over the batch. With answers of a
    few and of 20-odd labelled tokens the groupings differ, so batch_size 4 gives three losses for
    micro-batch sizes 1, 2 and 4 (the last: the whole batch's per-token mean); in float64 each holds to
    1e-9. Dropout 0; the adapter's B is not 0, so the adapter is in the loss."""
    model = hf.from_pretrained(str(tiny_dir), dtype=torch.float64)
    tok = hf.load_tokenizer(str(tiny_dir), model.config)
    lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, dropout=0.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    init = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1
            for k, v in lora.get_adapter(model, "global").items()}
    records = [r for c in small_fed().clients for r in c]
    examples = [data.encode_example(tok, r) for r in records]
    counts = [sum(x != data.IGNORE_INDEX for x in e["labels"]) for e in examples]  # labelled tokens
    n = sorted(set(counts))
    examples = [examples[counts.index(k)] for k in (n[0], n[1], n[-2], n[-1])]  # the shortest and longest answers

    def mean_loss(mb):  # each micro-batch's per-token mean, from the model's full logits
        ids, mask, labels = data.collate(mb, tok.pad_id)
        with torch.no_grad(), lora.mixed(model, {"global": 1.0}):
            logits = model(ids, mask)[0]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=data.IGNORE_INDEX).item()

    want = {}
    for micro in (1, 2, 4):
        lora.load_adapter(model, "global", init)
        order = torch.randperm(4, generator=torch.Generator().manual_seed(7)).tolist()  # the one batch's order
        batch = [examples[i] for i in order]
        want[micro] = sum(mean_loss(batch[i:i + micro]) for i in range(0, 4, micro)) / (4 // micro)
        train = fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=micro)
        client = fed.Client(0, examples, torch.Generator().manual_seed(7))
        _, got = fed.train_adapter(model, client, adapters={"global": init}, weights={"global": 1.0}, trains="global",
                                   train=train, pad_id=tok.pad_id)
        assert got["loss"] == pytest.approx(want[micro], rel=1e-9, abs=0), micro
        assert got["steps"] == 1 and got["examples"] == 4
    # the three groupings give three numbers (about 3e-3 apart here), each a thousand tolerances and more
    # from the others: the comparison above tells the definitions apart
    assert min(abs(want[a] - want[b]) for a, b in ((1, 2), (1, 4), (2, 4))) > 1e-6 * want[4]
