"""AdaInfer for generation, against plain greedy decoding and cache-free references."""
import pytest
import torch

from model import flops, generate
from skip.adainfer import CRFClassifier, SVM, Threshold, labels, trace
from skip.adainfer_gen import generate_adainfer
from skip.exit_decode import frequent_vocab
from skip.layerwise import layerwise_forward, prompt_then

PROMPT = [5, 6, 7, 8, 9]


def calibrated_threshold(model, check_every=1, vocab=None):
    """A gap threshold (through the head the checks use) that exits at some checked layers and
    not at others on this random model."""
    res = generate_adainfer(model, PROMPT, None, 10, vocab=vocab, eos=[], collect=True)
    checked = list(range(check_every - 1, model.cfg.n_layers - 1, check_every))
    gaps = torch.cat([t.feats[checked, 0] for t in res.traces])
    return Threshold(float(gaps.quantile(0.6)))


@torch.no_grad()
def test_never_stopping_is_plain_greedy_decoding(method_pair):
    _, model = method_pair
    with model.recording() as runs:
        res = generate_adainfer(model, PROMPT, None, 10, eos=[])
    with model.recording() as plain:
        ref = generate(model, [PROMPT], max_new_tokens=10, eos=[])[0]
    assert res.tokens == ref and res.exit_layers == [model.cfg.n_layers - 1] * 9
    assert flops.total(model.cfg, runs) == flops.total(model.cfg, plain)


@torch.no_grad()
@pytest.mark.parametrize("check_every,cheap", [(1, False), (2, False), (1, True)])
def test_state_propagation_equals_the_cache_free_reference(method_pair, check_every, cheap):
    _, model = method_pair
    L = model.cfg.n_layers
    vocab = None
    if cheap:  # the even ids and the model's own greedy tokens, as a frequent-token head holds them
        plain = generate(model, [PROMPT], max_new_tokens=10, eos=[])[0]
        vocab = torch.unique(torch.cat([torch.arange(0, model.cfg.vocab_size, 2), torch.tensor(plain)]))
    res = generate_adainfer(model, PROMPT, calibrated_threshold(model, check_every, vocab), 10,
                            check_every=check_every, vocab=vocab, eos=[])
    assert all(e == L - 1 or e % check_every == check_every - 1 for e in res.exit_layers)
    runs = prompt_then(L, len(PROMPT), [range(e + 1) for e in res.exit_layers])
    ids = torch.tensor([PROMPT + res.tokens[:-1]])
    # the reference emits each token from its exit layer's logit lens: rebuild those logits
    h_logits = []
    for t, e in enumerate(res.exit_layers):
        r = runs.clone()
        r[e + 1:, len(PROMPT) + t] = False
        h_logits.append(layerwise_forward(model, ids, r)[0, len(PROMPT) + t])
    assert res.tokens[1:] == [int(x.argmax()) for x in h_logits]
    assert min(res.exit_layers) < L - 1  # some token did exit early
    for t, (e, checks) in enumerate(zip(res.exit_layers, res.checks)):  # an exit stands only where the full
        if e < L - 1:  # head's top-1 is the checked (cheap) top-1
            assert checks[-1][0] == e and res.tokens[t + 1] == checks[-1][2]


@torch.no_grad()
def test_recompute_keeps_the_exact_cache(method_pair):
    _, model = method_pair
    res = generate_adainfer(model, PROMPT, calibrated_threshold(model), 10, fill="recompute", eos=[])
    ids = torch.tensor([PROMPT + res.tokens[:-1]])
    from model import positions
    pos = positions(None, 0, ids.shape[1])
    states = []
    model.run_layers(model.embed_tokens(ids, pos), pos, callback=lambda i, h, a, m: states.append(h))
    for t, e in enumerate(res.exit_layers):  # every state is the full model's; the token comes from layer e
        at = len(PROMPT) + t
        assert res.tokens[t + 1] == int(model.logits(states[e][:, at:at + 1])[0, 0].argmax())


def test_bad_settings_raise(method_pair):
    _, model = method_pair
    crf = CRFClassifier()
    with pytest.raises(ValueError, match="use check_every=1"):
        generate_adainfer(model, PROMPT, crf, 4, check_every=2)
    with pytest.raises(ValueError, match="'propagate' or 'recompute'"):
        generate_adainfer(model, PROMPT, Threshold(0.5), 4, fill="skip")


@torch.no_grad()
def test_classifiers_train_on_generation_traces(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    traces = []
    for p in ([5, 6, 7], [9, 3, 4, 1]):
        res = generate_adainfer(model, p, None, 12, eos=[], collect=True)
        assert len(res.traces) == 11  # one per fed-back token
        for s, t in enumerate(res.traces):  # token s, fed back with the cache: as a full pass over its prefix
            full = trace(model, p + res.tokens[:s + 1], answer=0)
            assert torch.allclose(t.feats, full.feats, rtol=0, atol=1e-5) and t.top1 == full.top1
            # "final": the layers whose top-1 is the token generated next
            assert labels(t, "final") == [int(x == res.tokens[s + 1]) for x in full.top1]
        traces += res.traces
    svm = SVM().fit(traces, "final")
    res = generate_adainfer(model, [5, 6, 7], svm, 8, eos=[])
    assert len(res.tokens) == 8
    L = model.cfg.n_layers
    assert len(set(res.exit_layers)) > 1  # it exits at several layers, so the comparison below can fail
    for e, checks in zip(res.exit_layers, res.checks):  # the live exits are the SVM's on the recorded features
        assert [layer for layer, _, _ in checks] == list(range(min(e + 1, L - 1)))
        assert svm.stop_at([row for _, row, _ in checks]) == (None if e == L - 1 else e)
    assert frequent_vocab([[1, 1, 2], [2, 2, 3]], n=2).tolist() == [1, 2]
