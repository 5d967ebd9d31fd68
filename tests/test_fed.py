"""fed.py: FedAvg, and what crosses the client/server boundary in the round loop."""
import torch

import data
import fed
import feddpa
import lora

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
    step = feddpa.feddpa_t_step(m, tok.pad_id, train, 0.5, seed=0)

    def recording(r, c, g):
        update, metrics = step(r, c, g)
        # what is sent is the global adapter the client just trained, value for value, and not its local one
        assert all(torch.equal(v, lora.get_adapter(m, "global")[k]) for k, v in update.adapter.items())
        if c.local is not None:
            assert not any(torch.equal(update.adapter[k], c.local[k]) for k in update.adapter if "lora_B" in k)
        sent.append((c, update))
        return update, metrics
    federation = fed.run_rounds(fed.Federation(init, len(clients)), 2, fed.in_process(clients, recording),
                                fraction=2 / 3, seed=0)
    assert len(federation.history) == 2 and all(len(h["clients"]) == 2 for h in federation.history)
    for c, update in sent:
        assert set(update.adapter) == set(init)
        if c.local is not None:
            assert all(update.adapter[k] is not c.local[k] for k in update.adapter)
    assert federation.history[0]["bytes_up"] == 2 * fed.nbytes(init)
