"""AdaInfer for generation, against plain greedy decoding and cache-free references."""
import pytest
import torch

from model import flops, generate
from skip.adainfer import CRFClassifier, SVM, Threshold, labels
from skip.adainfer_gen import generate_adainfer
from skip.exit_decode import frequent_vocab
from skip.layerwise import layerwise_forward, prompt_then

PROMPT = [5, 6, 7, 8, 9]


def calibrated_threshold(model, check_every=1):
    """A gap threshold that exits at some checked layers and not at others on this random model."""
    res = generate_adainfer(model, PROMPT, None, 10, eos=[], collect=True)
    checked = list(range(check_every - 1, model.cfg.n_layers - 1, check_every))
    gaps = torch.cat([t.feats[checked, 0] for t in res.traces])
    return Threshold(float(gaps.quantile(0.6)))


@torch.no_grad()
def test_never_stopping_is_plain_greedy_decoding(pair):
    _, model = pair
    with model.recording() as runs:
        res = generate_adainfer(model, PROMPT, None, 10, eos=[])
    with model.recording() as plain:
        ref = generate(model, [PROMPT], max_new_tokens=10, eos=[])[0]
    assert res.tokens == ref and res.exit_layers == [model.cfg.n_layers - 1] * 9
    assert flops.total(model.cfg, runs) == flops.total(model.cfg, plain)


@torch.no_grad()
@pytest.mark.parametrize("check_every,cheap", [(1, False), (2, False), (1, True)])
def test_state_propagation_equals_the_cache_free_reference(pair, check_every, cheap):
    _, model = pair
    L = model.cfg.n_layers
    vocab = torch.arange(0, model.cfg.vocab_size, 2) if cheap else None
    res = generate_adainfer(model, PROMPT, calibrated_threshold(model, check_every), 10, check_every=check_every,
                            vocab=vocab, eos=[])
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
    assert cheap or min(res.exit_layers) < L - 1


@torch.no_grad()
def test_recompute_keeps_the_exact_cache(pair):
    _, model = pair
    res = generate_adainfer(model, PROMPT, calibrated_threshold(model), 10, fill="recompute", eos=[])
    ids = torch.tensor([PROMPT + res.tokens[:-1]])
    from model import positions
    pos = positions(None, 0, ids.shape[1])
    states = []
    model.run_layers(model.embed_tokens(ids, pos), pos, callback=lambda i, h, a, m: states.append(h))
    for t, e in enumerate(res.exit_layers):  # every state is the full model's; the token comes from layer e
        at = len(PROMPT) + t
        assert res.tokens[t + 1] == int(model.logits(states[e][:, at:at + 1])[0, 0].argmax())


def test_bad_settings_raise(pair):
    _, model = pair
    crf = CRFClassifier()
    with pytest.raises(ValueError, match="use check_every=1"):
        generate_adainfer(model, PROMPT, crf, 4, check_every=2)
    with pytest.raises(ValueError, match="'propagate' or 'recompute'"):
        generate_adainfer(model, PROMPT, Threshold(0.5), 4, fill="skip")


@torch.no_grad()
def test_classifiers_train_on_generation_traces(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    traces = [t for p in ([5, 6, 7], [9, 3, 4, 1]) for t in generate_adainfer(model, p, None, 12, eos=[], collect=True).traces]
    assert all(len(t.feats) == model.cfg.n_layers for t in traces)
    for t in traces:  # "final" labels: the last layer always agrees with itself
        assert labels(t, "final")[-1] == 1
    svm = SVM().fit(traces, "final")
    res = generate_adainfer(model, [5, 6, 7], svm, 8, eos=[])
    assert len(res.tokens) == 8
    assert frequent_vocab([[1, 1, 2], [2, 2, 3]], n=2).tolist() == [1, 2]
