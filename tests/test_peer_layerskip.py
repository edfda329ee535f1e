"""transformers' self-speculative decoding (LayerSkip's method, `generate(assistant_early_exit=l)`)
checked round by round against this project's adapter-free Kangaroo (generate_kangaroo with
adapter=None): the same algorithm, so after the two documented rules (docs/traces.md, "Peers
checked round by round") every round drafts the same tokens and the full model accepts as many."""
import pytest
import torch

from model import load_model
from skip.kangaroo import generate_kangaroo
from skip.peer_layerskip import as_transformers, drafter_settings, layerskip_rounds, recording
from tokenizer import encode_chat

from conftest import VARIANTS, build_hf

N = 24
PROMPTS = ([5, 6, 7, 8, 9, 10], [11, 3, 40, 7])
LLAMAS = [name for name in VARIANTS if name.startswith("llama")]
# (l, gamma, eta): every (l, gamma), (l, eta) and (gamma, eta) pair of values once (a Latin square)
GRID = [(l, g, (0.0, 0.4, 0.6)[(i + j) % 3]) for i, l in enumerate((1, 2, 3)) for j, g in enumerate((1, 3, 6))]
SMOL = ["What is the capital of France?", "Write a haiku about autumn leaves.",
        "Explain in two sentences why the sky is blue."]


def tiny(name, tmp_path_factory, scale=0.3):
    """A golden tiny model with layers [1, L) scaled down, so that drafts from every exit are often
    accepted and round boundaries move; (transformers model, ours loaded from its files)."""
    hf = build_hf(*VARIANTS[name])
    if name.startswith("llama"):
        with torch.no_grad():
            for block in hf.model.layers[1:]:
                block.self_attn.o_proj.weight.mul_(scale)
                block.mlp.down_proj.weight.mul_(scale)
    path = tmp_path_factory.mktemp(f"peer_{name}")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(path)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return tiny("llama_gqa", tmp_path_factory)


def check(hf, m, prompt, l, gamma, eta, n=N, eos=None):
    """Ours, and transformers fed the prompt plus our first token (rule 1: it has no prefill
    token): its tokens must be ours and its rounds ours after the EOS rule (rule 2). Returns ours
    and the (our round, transformers' round) pairs that the EOS rule tells apart."""
    eos = m.cfg.eos_token_id if eos is None else eos
    ours = generate_kangaroo(m, prompt, None, l=l, gamma=gamma, eta=eta, max_new_tokens=n, eos=eos)
    peer = layerskip_rounds(hf, prompt + ours.tokens[:1], l, gamma, eta, n - 1, eos=eos)
    want = as_transformers(ours.rounds, set(eos))
    assert ours.tokens[:1] + peer.tokens == ours.tokens, (l, gamma, eta)
    assert peer.rounds == want, (l, gamma, eta)
    return ours, [(a, b) for a, b in zip(ours.rounds, want) if a != b]


@pytest.mark.parametrize("name", LLAMAS)
def test_tiny_llamas_draft_and_accept_the_same_tokens_every_round(name, tmp_path_factory):
    hf, m = tiny(name, tmp_path_factory)
    accepted = short = 0
    # the whole grid on one model; the others differ in their layers only, not in the algorithm
    for prompt in PROMPTS if name == "llama_gqa" else PROMPTS[:1]:
        for l, gamma, eta in GRID if name == "llama_gqa" else GRID[::4]:
            ours, _ = check(hf, m, prompt, l, gamma, eta)
            accepted += sum(r.accepted for r in ours.rounds)
            short += sum(0 < r.drafted < gamma for r in ours.rounds)
    assert accepted > 0 and short > 0  # rounds accepted drafts and stopped early (eta or the end)


def test_without_the_first_token_the_tokens_agree_but_the_rounds_start_one_token_earlier(gqa):
    hf, m = gqa
    for prompt in PROMPTS:
        ours = generate_kangaroo(m, prompt, None, l=2, gamma=3, eta=0.4, max_new_tokens=N)
        peer = layerskip_rounds(hf, prompt, 2, 3, 0.4, N)
        assert peer.tokens == ours.tokens
        # ours: the prefill commits the first token, then rounds; transformers: rounds only
        assert sum(r.accepted + 1 for r in ours.rounds) == len(ours.tokens) - 1
        assert sum(r.accepted + 1 for r in peer.rounds) == len(peer.tokens)


def test_transformers_stops_drafting_at_an_eos_draft_and_counts_no_accepted_eos(gqa):
    hf, m = gqa
    # the model's EOS (2) is drafted and rejected: transformers drafts nothing after it
    _, changed = check(hf, m, PROMPTS[1], 2, 6, 0.0)
    assert changed and all(w.drafts[-1] == 2 and len(w.drafts) < len(r.drafts) and w.accepted == r.accepted
                           for r, w in changed)
    # with 22 as EOS, 22 is drafted and accepted: transformers does not count it as accepted
    _, changed = check(hf, m, PROMPTS[1], 3, 3, 0.0, eos=[22])
    assert changed and all(w.drafts[-1] == 22 and w.accepted == len(w.drafts) - 1 < r.accepted for r, w in changed)


def test_transformers_drafter_runs_the_shallow_layers_again(gqa):
    """Its drafter keeps its own cache of layers [0, l) and verification runs all layers on x and
    the drafts: layers [0, l) run on every slot twice. Ours verify from the drafted h_l: once."""
    hf, m = gqa
    for l, gamma, eta in [(2, 3, 0.0), (3, 6, 0.4)]:
        ours = generate_kangaroo(m, PROMPTS[0], None, l=l, gamma=gamma, eta=eta, max_new_tokens=N)
        slots = len(PROMPTS[0]) + sum(r.drafted + 1 for r in ours.rounds)  # M^s runs once on each
        seen = {"draft": 0, "verify": 0}

        def count(module, args, out):  # the drafter is the model with config.num_hidden_layers = l
            seen["draft" if hf.model.config.num_hidden_layers == l else "verify"] += args[0].shape[1]
        hook = hf.model.layers[0].register_forward_hook(count)
        try:
            layerskip_rounds(hf, PROMPTS[0] + ours.tokens[:1], l, gamma, eta, N - 1)
        finally:
            hook.remove()
        # a round's drafter runs as many slots as M^s here (it skips the last draft, but runs the slot
        # before x again), one fewer in the first round (the prompt holds x), none without drafts
        assert seen == {"verify": slots, "draft": slots - 1 - sum(r.drafted == 0 for r in ours.rounds)}


def test_generate_arguments_do_not_reach_the_drafter(gqa):
    """num_assistant_tokens and assistant_confidence_threshold given to generate are ignored: the
    drafter reads the model's generation_config, whose defaults are 20 and 0.4."""
    hf, m = gqa
    prompt = PROMPTS[0]
    ours = generate_kangaroo(m, prompt, None, l=2, gamma=3, eta=0.0, max_new_tokens=N)
    x = torch.tensor([prompt + ours.tokens[:1]])
    rounds = []
    with recording(hf, rounds), torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N - 1,
                    assistant_early_exit=2, num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    defaults = generate_kangaroo(m, prompt, None, l=2, gamma=20, eta=0.4, max_new_tokens=N)
    assert rounds == as_transformers(defaults.rounds, set(m.cfg.eos_token_id))
    assert rounds != as_transformers(ours.rounds, set(m.cfg.eos_token_id))


def test_transformers_cannot_exit_early_on_opt_or_assist_a_batch(gqa, tmp_path_factory):
    hf, m = tiny("opt_pre", tmp_path_factory)
    assert generate_kangaroo(m, PROMPTS[0], None, l=2, gamma=3, eta=0.0, max_new_tokens=8).tokens
    with pytest.raises(IndexError):  # OPT's decoder runs every layer into an l-layer cache
        layerskip_rounds(hf, PROMPTS[0], 2, 3, 0.0, 8)
    x = torch.tensor([PROMPTS[0][:4], PROMPTS[1]])
    with pytest.raises(ValueError, match="assisted generate is only supported for batch_size = 1"):
        gqa[0].generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8, assistant_early_exit=2)


@pytest.mark.parametrize("l, gamma, eta, which", [(20, 3, 0.4, slice(0, 2)), (26, 6, 0.6, slice(2, 3))])
def test_smollm2_drafts_and_accepts_the_same_tokens_every_round(smollm2, smollm2_hf, l, gamma, eta, which):
    m, tok = smollm2
    accepted = 0
    for prompt in [encode_chat(tok, text) for text in SMOL[which]]:
        ours, _ = check(smollm2_hf, m, prompt, l, gamma, eta, n=12)
        accepted += sum(r.accepted for r in ours.rounds)
    assert accepted > 0


def test_drafter_settings_refuse_what_no_drafter_takes(gqa):
    hf, _ = gqa
    before = hf.generation_config.to_dict()
    for gamma, eta in [(-1, 0.4), (3, 2.0), (3, -0.1), (1.5, 0.4), (True, 0.4), (3, float("nan"))]:
        with pytest.raises(ValueError, match="gamma"):
            with drafter_settings(hf, gamma, eta):
                pass
    assert hf.generation_config.to_dict() == before  # refused before anything was set
