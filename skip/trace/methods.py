"""What a trace records of each method (skip/trace/format.py): one function per method runs it on a list
of prompts decoded as one batch (one prompt: a batch of one, the unbatched run), or batch_size rows
at a time from a queue (model/queue.py; the methods of QUEUED), and returns, per prompt, the
generated tokens and the per-step records that trace.py's docstring describes. A batch of more
than one (skip/trace/batch.py) records each row's own steps: Kangaroo's through the row=
callbacks of generate_kangaroo, its cache lengths counted over the row's own slots.
"""
from __future__ import annotations

import contextlib

import torch

from model import flops, generate, generate_queue

from ..adainfer import Threshold
from ..adainfer_files import load_classifier, params
from ..adainfer_gen import generate_adainfer
from ..baselines import generate_skipdecode, generation_schedule
from ..kangaroo import generate_kangaroo
from ..kangaroo_batch import check_policy, generate_kangaroo_batch
from ..kangaroo_files import load_adapter
from ..unified import generate_unified, kept_layers
from .format import TOP_K, TraceError, prompt_pass, settings_used, write


def full_steps(model, prompts, max_new_tokens, settings, batch_size=None):
    return [(t, []) for t in (generate(model, prompts, max_new_tokens=max_new_tokens) if batch_size is None else
                              generate_queue(model, prompts, batch_size, max_new_tokens=max_new_tokens))]


def unified_steps(model, prompts, max_new_tokens, settings):
    kept = kept_layers(model.cfg.n_layers, settings["r"])
    return [(t, [{"kept_layers": kept}]) for t in generate_unified(model, prompts, settings["r"],
                                                                    max_new_tokens=max_new_tokens)]


def skipdecode_steps(model, prompts, max_new_tokens, settings):
    schedule = generation_schedule(model.cfg.n_layers, settings["r"], max_new_tokens)
    return [(t, [{"schedule": schedule}]) for t in generate_skipdecode(model, prompts, settings["r"], max_new_tokens)]


def adainfer_steps(model, prompts, max_new_tokens, settings, batch_size=None):
    if "classifier" not in settings:  # the paper's gap threshold
        outs = generate_adainfer(model, prompts, Threshold(settings["tau"]), max_new_tokens, collect=False,
                                 batch_size=batch_size)
        return [(o.tokens, [{"exit_layer": e, "checks": c} for e, c in zip(o.exit_layers, o.checks)]) for o in outs]
    clf = load_classifier(settings["classifier"], model.cfg)
    # the trace holds the file's content, not its path, so that a port's trace compares wherever its copy lies
    settings["classifier"] = {"kind": clf.kind, "features": list(clf.features), "params": params(clf)}
    vocab = settings["vocab"]
    if vocab is not None and not (isinstance(vocab, list) and len(vocab) >= 2 and
                                  all(isinstance(i, int) and 0 <= i < model.cfg.vocab_size for i in vocab)):
        raise TraceError(f"vocab must be null or a list of at least 2 token ids below {model.cfg.vocab_size}")
    outs = generate_adainfer(model, prompts, clf, max_new_tokens, settings["check_every"],
                             None if vocab is None else torch.tensor(vocab), batch_size=batch_size)
    rows = []
    for out in outs:
        steps = []
        for e, checks in zip(out.exit_layers, out.checks):  # its decisions are a function of the rows it decided on
            scores, stops = zip(*clf.decisions([row for _, row, _ in checks])) if checks else ((), ())
            steps.append({"exit_layer": e, "checks": checks, "scores": list(scores), "stops": list(stops)})
        rows.append((out.tokens, steps))
    return rows


def own_lengths(cache, b):
    """The valid length of each layer of batch row b's cache: its padding and holes (slots the rows
    share, model/cache.py) left out, so the length it has when run alone."""
    return cache.lengths[:] if cache.valid is None else [int(cache.valid[b, :n].sum()) for n in cache.lengths]


def layer_run(layer, position, h):
    """A trace's record of one run of `layer` from slot `position` (a batched row's own position),
    its output h (1, T, d): [position, layer, the norm of h at each slot]."""
    return [position, layer, h[0].float().norm(dim=-1).tolist()]


def layer_watcher(runs):
    """An observer (Decoder.observing) that appends each layer the decoder runs to runs, as the
    decoder reports it (one sequence: its slots are its positions)."""
    def watch(run, h):
        if isinstance(run, flops.LayerRun):
            runs.append(layer_run(run.layer, run.ctx, h))
    return watch


def kangaroo_steps(model, prompts, max_new_tokens, settings, batch_size=None, layer_runs=None):
    """layer_runs: one list per prompt, filled with that row's layer runs at its own slots."""
    # one prompt: each policy is the paper file's run (batch_k's with eta 0)
    check_policy(settings["policy"], settings["eta"])
    adapter = None if settings["adapter"] is None else load_adapter(settings["adapter"], model)
    steps = [[] for _ in prompts]
    seen = [{"draft_top_ids": [], "draft_top_probs": []} for _ in prompts]
    order = []  # the prompt of each batch row this round: verify, then on_round, see every row in batch order

    def observe(kind, h_l, logits, ids, row=0):  # one round's drafts, then its verification
        top = logits.float().softmax(-1).topk(TOP_K)
        top_ids = (top.indices if ids is None else ids[top.indices]).tolist()  # ids: the draft head's rows
        if kind == "draft":
            seen[row]["draft_top_ids"].append(top_ids)
            seen[row]["draft_top_probs"].append(top.values.tolist())
        else:
            order.append(row)
            seen[row].update(exited_norms=h_l[0].float().norm(dim=-1).tolist(), verify_top_ids=top_ids,
                             verify_top_probs=top.values.tolist())

    def on_round(tokens, caches, row=0):
        b = order.index(row)
        steps[row].append({"cache_lengths": own_lengths(caches[0], b),  # adapter-free: no adapter cache, 0
                           "adapter_cache_length": 0 if caches[1] is None else own_lengths(caches[1], b)[0],
                           **seen[row]})
        seen[row] = {"draft_top_ids": [], "draft_top_probs": []}
        if b == len(order) - 1:  # the round's last row
            order.clear()
    def on_layer(layer, position, h, row):
        layer_runs[row].append(layer_run(layer, position, h))
    kw = dict(l=settings["l"], max_new_tokens=max_new_tokens, gamma=settings["gamma"], eta=settings["eta"],
              draft_vocab=settings["draft_vocab"], on_round=on_round, observe=observe)
    if len(prompts) > 1:
        outs = generate_kangaroo_batch(model, prompts, adapter, **kw, on_layer=on_layer if layer_runs else None,
                                       policy=settings["policy"], batch_size=batch_size)
    else:  # one prompt: the paper's file, its layer runs as the decoder reports them
        with model.observing(layer_watcher(layer_runs[0])) if layer_runs else contextlib.nullcontext():
            outs = [generate_kangaroo(model, prompts[0], adapter, **kw)]
    for out, own in zip(outs, steps):
        for s, r in zip(own, out.rounds):
            s.update(drafted=r.drafted, accepted=r.accepted, drafts=r.drafts)
    return [(out.tokens, own) for out, own in zip(outs, steps)]


# each method's function: (model, prompts, max_new_tokens, settings as trace.settings_used gives them); those
# of QUEUED also take batch_size (a queue of the prompts through that many rows)
METHODS = {"full": full_steps, "unified": unified_steps, "skipdecode": skipdecode_steps, "adainfer": adainfer_steps,
           "kangaroo": kangaroo_steps}
QUEUED = ("full", "adainfer", "kangaroo")


def trace(model, ids, path, method="full", max_new_tokens=16, settings=None, force=False):
    """Write the trace of our decoder running method on prompt ids to directory path."""
    settings = settings_used(method, settings or {})
    layer_runs = []  # every layer the method runs: the slots it ran at and their norms
    with model.recording() as runs, model.observing(layer_watcher(layer_runs)):
        (tokens, steps), = METHODS[method](model, [ids], max_new_tokens, settings)
    write(path, model.cfg, ids, tokens, prompt_pass(model, ids), method, settings, steps, flops.total(model.cfg, runs),
          str(model.dtype).removeprefix("torch."), layer_runs, force)
