"""ModelRunner across steps: more adapters than device slots (evict + reload stays exact against PEFT), a slot
reused after eviction carries no residue, and a refused adapter leaves the runner exactly as it was."""
from __future__ import annotations

import pytest
import torch
from support import Rows, peft_model_for
from safetensors.torch import load_file, save_file

from server.adapters.formats import WEIGHTS_FILE, AdapterFormatError, check_against_base, load_adapter_dir
from server.config import EngineConfig
from server.engine.runner import ModelRunner

MAX_RANK, SLOTS = 8, 4


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(EngineConfig(model=str(tiny_model_dir), max_loras=SLOTS, max_lora_rank=MAX_RANK,
                                    max_num_seqs=8, max_model_len=128))


@pytest.fixture(scope="module", params=["per-layer", "banks", "mixed"])
def host(request, adapters, runner):
    """The runner's weights callback: name -> AdapterWeights, validated against the runner's base, and packed
    for its slot banks ("banks", as the store does), not packed ("per-layer": the path DoRA and mixed-kind
    banks take), or every other adapter packed ("mixed": both fill paths meet in the same slots)."""
    cache = {}

    def weights(key):
        if key[0] not in cache:
            w = load_adapter_dir(adapters[key[0]], key[0])
            check_against_base(w, runner.targets, MAX_RANK)
            if request.param == "banks" or (request.param == "mixed" and len(cache) % 2 == 0):
                w.prepare_slots(runner.manager.layout)
                runner.prepare_dora(w)  # as the store's loader thread does
            cache[key[0]] = w
        return cache[key[0]]
    return weights


def test_dora_factors_never_computed_on_the_step_thread(runner, adapters, monkeypatch):
    """After the loader thread's prepare_dora, activating DoRA reads no base weight (that took ~0.2 s of the
    step thread for SmolLM2) and its banks are packed like LoRA's."""
    from server.layers import adapter_linear

    evict_all(runner)
    w = load_adapter_dir(adapters["dora"], "dora")
    check_against_base(w, runner.targets, MAX_RANK)
    w.prepare_slots(runner.manager.layout)
    assert not w.packed  # no factors yet: nothing DoRA can pack
    runner.prepare_dora(w)
    assert w.packed and all(p.out_scale is not None for p in w.packed.values())
    assert all(m.dora_scale is not None and m.b is None for m in w.modules.values())
    monkeypatch.setattr(adapter_linear, "dense_weight", lambda layer: pytest.fail("base weight read at activation"))
    runner.manager.activate([[(("dora", 0), 1.0)]], [1], lambda k: w)
    runner.manager.evict(("dora", 0))


def slot_state(runner, slot):
    return {p: (l.ranks[slot], slot in l.in_scaled, slot in l.out_scaled,
                [t[slot].clone() for t in (l.lora_a, l.lora_b, l.in_scale, l.out_scale)]) for p, l in runner.layers.items()}


@pytest.mark.parametrize("name", ["lora", "rslora", "lora_pattern", "ia3", "adalora", "dora"])
def test_bank_fill_equals_layer_by_layer_fill(runner, adapters, name):
    """A packed adapter (one copy per bank) lands exactly as the layer-by-layer fill does, including rank
    padding (rank_pattern) and adapters that target only some members of a bank; both fills follow a
    different adapter in the slot, so what they clear is checked too."""
    evict_all(runner)
    per_layer = load_adapter_dir(adapters[name], name)
    packed = load_adapter_dir(adapters[name], name)
    packed.prepare_slots(runner.manager.layout)
    runner.prepare_dora(packed)
    assert packed.packed, "nothing packed: the bank path is not exercised"
    states = []
    for w in (per_layer, packed):
        for key, weights in ((("lora2", 0), load_adapter_dir(adapters["lora2"], "lora2")), ((name, 0), w)):
            runner.manager.activate([[(key, 1.0)]], [1], lambda k, w=weights: w)
            states.append(slot_state(runner, runner.manager.slot_of[key]))
            runner.manager.evict(key, clear=key[0] != "lora2")  # the second adapter takes lora2's dirty slot
    for path, (rank, ins, outs, tensors) in states[1].items():
        other = states[3][path]
        assert (rank, ins, outs) == other[:3], path
        assert all(torch.equal(x, y) for x, y in zip(tensors, other[3])), path


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapters):
    """name -> PEFT logits for a token sequence, [len(seq), vocab] (models cached per adapter)."""
    models = {}

    @torch.no_grad()
    def logits(name, seq):
        if name not in models:
            models[name] = peft_model_for(tiny_model_dir, None if name is None else adapters[name])
        return models[name](input_ids=torch.tensor([seq])).logits[0].float()
    return logits


def keys(names):
    return [None if n is None else (n, 0) for n in names]


def prompts_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 300, (n,), generator=gen).tolist() for n in lengths]


def evict_all(runner):
    for key in list(runner.manager.slot_of):
        runner.manager.evict(key)


# ---------------------------------------------------------------- more adapters than slots

def test_more_adapters_than_slots_evict_and_reload_stay_exact(runner, host, oracle):
    """Rows 0-3 decode greedily; before every other step a new request's prefill (rows 4-7) needs four other
    adapters, evicting all of the running ones, which the next decode must reload into whatever slot is free."""
    rows = Rows(runner)
    running, others = ["lora", "dora", None, "ia3"], ["rslora", "lora_pattern", "adalora", "lora2"]
    evict_all(runner)  # the runner is shared by every ``host`` mode
    prompts = prompts_of([6, 3, 9, 5])
    loads0 = runner.manager.loads
    step_logits = [rows.prefill(0, prompts, keys(running), host)]
    fed = [[] for _ in prompts]
    for step in range(6):
        if step % 2 == 0:
            other_prompts = prompts_of([4, 7, 2, 8], seed=step + 1)
            got = rows.prefill(4, other_prompts, keys(others), host)
            for i, name in enumerate(others):
                ref = oracle(name, other_prompts[i])[-1]
                assert (got[i] - ref).abs().max().item() <= 1e-4, f"{name} after taking a used slot"
            assert not any(runner.manager.resident((n, 0)) for n in running if n)
        tokens = step_logits[-1].argmax(-1).tolist()
        for row, t in zip(fed, tokens):
            row.append(t)
        step_logits.append(rows.decode(tokens, host))
    # 3 first loads, then per interloper >= 3 of its adapters plus the 3 running ones reloaded
    assert runner.manager.loads - loads0 >= 3 + 3 * (3 + 3)
    ours = torch.stack(step_logits, 1)  # [rows, steps+1, vocab]
    for i, name in enumerate(running):
        ref = oracle(name, prompts[i] + fed[i])[len(prompts[i]) - 1:]
        diff = (ours[i] - ref).abs().max().item()
        assert diff <= 1e-4, f"{name}: {diff:.3g} from PEFT across evict/reload"
        assert ref.argmax(-1)[:-1].tolist() == fed[i], f"{name}: greedy tokens differ from PEFT"


# ---------------------------------------------------------------- slot reuse

def assert_slot_fresh(runner, slot):
    for path, layer in runner.layers.items():
        assert layer.ranks[slot] == 0 and slot not in layer.in_scaled and slot not in layer.out_scaled, path
        assert not layer.lora_a[slot].any() and not layer.lora_b[slot].any(), path
        assert torch.equal(layer.in_scale[slot], torch.ones_like(layer.in_scale[slot])), path
        assert torch.equal(layer.out_scale[slot], torch.ones_like(layer.out_scale[slot])), path
        if layer.out_shift is not None:
            assert not layer.out_shift[slot].any(), path


def test_slot_reused_after_evict_is_clean(runner, host, oracle):
    rows = Rows(runner)
    evict_all(runner)
    prompts = prompts_of([5, 8, 3], seed=7)
    rows.prefill(0, prompts, keys(["ia3", "dora", None]), host)  # IA3 and DoRA write the scale tables
    used = {runner.manager.slot_of["ia3", 0], runner.manager.slot_of["dora", 0]}
    runner.manager.evict(("ia3", 0))
    runner.manager.evict(("dora", 0))
    for slot in used:
        assert_slot_fresh(runner, slot)
    for layer in runner.layers.values():  # the identity row base tokens read is never written
        assert torch.equal(layer.in_scale[SLOTS], torch.ones_like(layer.in_scale[SLOTS]))
        assert torch.equal(layer.out_scale[SLOTS], torch.ones_like(layer.out_scale[SLOTS]))
    mixed = rows.prefill(0, prompts, keys(["lora", None, "rslora"]), host)
    assert {runner.manager.slot_of["lora", 0], runner.manager.slot_of["rslora", 0]} == used
    for i, name in ((0, "lora"), (2, "rslora")):
        assert (mixed[i] - oracle(name, prompts[i])[-1]).abs().max().item() <= 1e-4
    unwrapped = rows.prefill(0, prompts, [None] * 3, host)  # no slot in the step: every layer is the bare base
    assert torch.equal(mixed[1], unwrapped[1]), "a base row must not see anything of a reused slot"
    assert (unwrapped[1] - oracle(None, prompts[1])[-1]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- refused adapters

def save_peft(tiny_model_dir, out, config, seed=0):
    """Only the adapter's own tensors are saved (no copies of embedding / head base weights)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, save_embedding_layers=False)
    return out


def rewrite_tensors(directory, edit):
    path = directory / WEIGHTS_FILE
    save_file(dict(edit(load_file(str(path)))), str(path))
    return directory


@pytest.fixture(scope="module")
def bad(tiny_model_dir, tmp_path_factory):
    """name -> (adapter dir, words the error must contain)."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("bad")
    qv = ["q_proj", "v_proj"]
    made = {
        "head": (save_peft(tiny_model_dir, root / "head", LoraConfig(r=4, target_modules=qv + ["lm_head"])),
                 ["'lm_head'", "not a linear layer"]),
        "rank": (save_peft(tiny_model_dir, root / "rank", LoraConfig(r=16, target_modules=qv)),
                 ["rank 16 > --max-lora-rank 8"]),
        "embedding": (save_peft(tiny_model_dir, root / "emb", LoraConfig(r=4, target_modules=qv + ["embed_tokens"])),
                      ["embedding LoRA"]),
    }
    layer5 = save_peft(tiny_model_dir, root / "layer5", LoraConfig(r=4, target_modules=qv))
    made["missing-module"] = (rewrite_tensors(layer5, lambda t: ((k.replace("layers.1.", "layers.5."), v)
                                                                  for k, v in t.items())),
                              ["'model.layers.5.self_attn.", "not a linear layer"])
    shape = save_peft(tiny_model_dir, root / "shape", LoraConfig(r=4, target_modules=qv))
    narrow = "layers.0.self_attn.v_proj.lora_A"  # in_features 64 -> 32
    made["shape"] = (rewrite_tensors(shape, lambda t: ((k, v[:, :32].contiguous() if narrow in k else v)
                                                       for k, v in t.items())),
                     ["model.layers.0.self_attn.v_proj.a has shape (4, 32)", "(4, 64)"])
    return made


def snapshot(runner):
    """Everything a load or an eviction touches (LRU recency aside: a failed step may still touch it)."""
    layers = {p: (list(l.ranks), set(l.in_scaled), set(l.out_scaled),
                  [b.clone() for b in (l.lora_a, l.lora_b, l.in_scale, l.out_scale)]) for p, l in runner.layers.items()}
    return dict(runner.manager.slot_of), runner.manager.loads, set(runner.manager.pinned), layers


def assert_unchanged(before, after):
    assert before[:3] == after[:3], f"manager state changed: {before[:3]} -> {after[:3]}"
    for path, (ranks, in_scaled, out_scaled, buffers) in before[3].items():
        assert (ranks, in_scaled, out_scaled) == after[3][path][:3], path
        assert all(torch.equal(x, y) for x, y in zip(buffers, after[3][path][3])), path


def loading(bad_dir, runner, host):
    """A weights callback that reads and validates on demand, as a store would: bad -> the refused adapter."""
    def weights(key):
        if key[0] != "bad":
            return host(key)
        w = load_adapter_dir(bad_dir, "bad")
        check_against_base(w, runner.targets, MAX_RANK)
        return w
    return weights


def refuse(runner, weights, directory, words, prompts):
    rows = Rows(runner)
    with pytest.raises(AdapterFormatError) as err:
        rows.prefill(0, prompts, keys(["lora", "bad", None]), weights)
    msg = str(err.value)
    assert str(directory) in msg, f"error must name the file: {msg}"
    for w in words:
        assert w in msg, f"error must say why ({w!r}): {msg}"
    assert runner.holder.mapping.empty


@pytest.mark.parametrize("case", ["head", "rank", "embedding", "missing-module", "shape"])
def test_refused_adapter_names_file_and_reason_and_changes_nothing(runner, host, bad, case):
    rows = Rows(runner)
    directory, words = bad[case]
    evict_all(runner)
    prompts = prompts_of([4, 6, 3], seed=11)
    rows.prefill(0, prompts, keys(["lora", "dora", None]), host)  # two resident, two free slots
    before_logits = rows.prefill(0, prompts, keys(["lora", None, None]), host)
    before = snapshot(runner)
    refuse(runner, loading(directory, runner, host), directory, words, prompts)
    assert_unchanged(before, snapshot(runner))
    assert torch.equal(rows.prefill(0, prompts, keys(["lora", None, None]), host), before_logits)


def test_refused_adapter_with_full_slots_evicts_nothing(runner, host, bad):
    rows = Rows(runner)
    directory, words = bad["rank"]
    evict_all(runner)
    prompts = prompts_of([4, 6, 3], seed=12)
    rows.prefill(0, prompts + [[7, 8]], keys(["lora", "dora", "ia3", "adalora"]), host)  # all slots full
    before = snapshot(runner)
    refuse(runner, loading(directory, runner, host), directory, words, prompts)
    assert_unchanged(before, snapshot(runner))


def test_too_many_adapters_in_one_step_is_refused_before_touching_slots(runner, host):
    rows = Rows(runner)
    before = snapshot(runner)
    names = ["lora", "dora", "ia3", "adalora", "rslora"]
    with pytest.raises(RuntimeError, match="5 adapters in one step but only 4 slots"):
        rows.prefill(0, prompts_of([3] * 5), keys(names), host)
    assert_unchanged(before, snapshot(runner))


def test_cpu_kv_pool_is_resident_from_the_start(runner):
    """On CPU the runner makes the KV pool resident at start: no step pays a page fault for its blocks' first
    write (host_memory.populate_in_background). Reading the untouched pool would fault in every page; reading does not write."""
    import resource

    assert runner.kv_resident.wait(60)  # populated on a daemon thread: the server does not wait for it to start
    pool = runner.kv.keys + runner.kv.values
    pages = sum(t.numel() * t.element_size() for t in pool) // 4096
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for t in pool:
        t.sum()  # reads every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert pages >= 256 and faults < 0.1 * pages, (faults, pages)  # unpopulated: a fault a page
