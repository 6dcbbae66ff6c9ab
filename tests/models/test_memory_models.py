"""Titans and HOPE as language models: causality, per-sequence memory, parameter parity."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import ON_DEVICES

from nl_lightning.models import PRESETS, Hope, Titans, TransformerPP
from nl_lightning.ops.projection import projection_gates

FAMILIES = [Titans, Hope]
SMALL = {"n_layer": 2, "chunk_size": 8, "proj_chunk_size": 8, "attn_window": 8}


def small_model(family, **overrides):
    torch.manual_seed(0)
    return family("tiny", overrides={**SMALL, **overrides}).eval()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(family, kind):
    model = small_model(family, memory_kind=kind)
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 21] = (changed[:, 21] + 7) % 256  # inside a chunk, not on its boundary
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :21], after[:, :21], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[:, 21:], after[:, 21:], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_batch_elements_do_not_share_memory_state(family):
    model = small_model(family)
    tokens = torch.randint(0, 256, (3, 32))
    changed = tokens.clone()
    changed[1] = torch.randint(0, 256, (32,))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[1], after[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_memory_makes_the_output_depend_on_distant_context(family):
    """Tokens far outside every attention window and conv kernel still reach the output through memory."""
    model = small_model(family, attn_window=4, conv_kernel=2)
    tokens = torch.randint(0, 256, (1, 48))
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 256
    with torch.no_grad():
        difference = (model(tokens)[0, -1] - model(changed)[0, -1]).abs().max()
    assert difference > 1e-3  # far above float32 noise (~1e-6)


@pytest.mark.parametrize(("write_rule", "names"), [("delta", ["beta", "alpha"]), ("paper", ["theta", "eta", "alpha"])])
def test_titans_gates_start_at_their_initial_values_after_model_init(write_rule, names):
    """The backbone's generic init must not overwrite the memory layer's gate init."""
    model = small_model(Titans, write_rule=write_rule)
    layer = model.blocks[0].mixer
    assert list(layer.initial_gates) == names
    gates = torch.sigmoid(layer.gates(torch.randn(1, 1, model.config.d_model))).view(len(names), -1)
    expected = torch.tensor(list(layer.initial_gates.values()))[:, None].expand_as(gates)
    torch.testing.assert_close(gates, expected)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_sequences_shorter_than_the_chunk_train(family):
    model = small_model(family, chunk_size=64, proj_chunk_size=64).train()
    tokens = torch.randint(0, 256, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 256) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count_within_ten_percent_of_transformer_at_the_same_preset(family, preset):
    with torch.device("meta"):
        model, baseline = family(preset), TransformerPP(preset)
    assert abs(model.num_parameters() - baseline.num_parameters()) <= 0.10 * baseline.num_parameters()


def test_hope_param_groups_carry_cms_periods_and_cover_every_parameter_once():
    model = small_model(Hope, cms_periods=[1, 4, 16])
    groups = model.param_groups()
    assert [g["period"] for g in groups] == [1, 1, 4, 16]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    level_2 = {id(p) for p in model.blocks[1].cms.levels[2].parameters()}
    assert level_2 <= {id(p) for p in groups[3]["params"]}


def test_cms_periods_must_run_fastest_first():
    with pytest.raises(ValueError, match="non-decreasing"):
        small_model(Hope, cms_periods=[16, 1])


@pytest.mark.parametrize("write_rule", ["delta", "paper"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("text", [b" " * 1024, b"    return x\n" * 80])
def test_memory_stays_finite_on_long_repetitive_text(family, text, write_rule):
    """Repetitive bytes make every key in a chunk alike: the chunked update must not overshoot."""
    torch.manual_seed(0)
    model = family("tiny", overrides={"n_layer": 2, "write_rule": write_rule}).eval()
    tokens = torch.tensor(list(text[:1024]))[None]
    with torch.no_grad():
        for block in model.blocks:  # emulate trained, larger memory weights
            for name, param in block.named_parameters():
                if "memory" in name or "projections" in name:
                    param.mul_(2.0)
        logits = model(tokens)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 1e3


FAST_PATHS = [  # (family, impl, write_rule, memory_target); auto: the C++ kernels on CPU
    (Hope, "chunk", "delta", "value"), (Hope, "auto", "delta", "value"), (Hope, "auto", "delta", "self"),
    (Hope, "auto", "paper", "value"), (Titans, "chunk", "delta", "value"), (Titans, "auto", "delta", "value"),
    (Titans, "chunk", "paper", "value"), (Titans, "cpu", "paper", "value"),
]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("stream", ["repeated-token", "large-norm"])
def test_memory_layers_stay_finite_over_16k_tokens_of_one_shot_writes(family, stream):
    """The default write rule with its gates pushed to one-shot writes (β → 1, nothing forgotten) on
    16K tokens of one repeated input or of inputs 1e4 times the usual norm: the read-outs stay
    finite and O(1) after the layer's norm (the ops' state bound is checked in tests/ops)."""
    torch.manual_seed(0)
    layer = small_model(family, n_layer=1).blocks[0].mixer
    with torch.no_grad():
        if family is Titans:
            layer.gates.bias.copy_(torch.tensor([12.0, -12.0]).repeat_interleave(layer.config.n_head))
        else:
            layer.gate_bias["eta"].fill_(12.0)
            layer.gate_bias["alpha"].fill_(12.0)
        d = layer.config.d_model
        x = torch.randn(1, 1, d).expand(1, 16384, d) if stream == "repeated-token" else 1e4 * torch.randn(1, 16384, d)
        y = layer(x.contiguous())
    assert torch.isfinite(y).all()
    assert y.abs().max() < 1e3


@pytest.mark.parametrize(
    ("family", "impl", "write_rule", "target"), FAST_PATHS, ids=["-".join(map(str, c[1:])) for c in FAST_PATHS]
)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fast_kernels_match_the_naive_reference_in_logits_and_grads(family, impl, write_rule, target, kind):
    """The models with their fast kernels (HOPE: shared-key projection update and chunk main
    memory; Titans: chunk memory; both fused on CPU, with the fused convolution) equal their
    token-by-token reference path, ``memory_impl="naive"``, in the forward and every gradient,
    under either write rule."""
    overrides = {
        "n_layer": 1 if family is Hope else 2,  # Titans: a memory layer, then attention
        "d_model": 32, "n_head": 2, "chunk_size": 4, "proj_chunk_size": 4, "memory_kind": kind,
        "write_rule": write_rule, "memory_target": target,
    }  # fmt: skip
    assert_matches_the_naive_reference(family, overrides, impl)


def assert_matches_the_naive_reference(family, overrides, impl, device="cpu"):
    """The model with ``memory_impl=impl`` against ``"naive"``: logits and every parameter gradient, float64."""
    fast = small_model(family, **overrides, memory_impl=impl).double().to(device)
    reference = small_model(family, **overrides, memory_impl="naive").double().to(device)
    reference.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 256, (2, 14), device=device)  # 14 = 3 full chunks and a partial one
    results = []
    for model in (fast, reference):
        logits = model(tokens)
        (logits.square().mean()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_fast, grads_fast), (logits_ref, grads_ref) = results
    torch.testing.assert_close(logits_fast, logits_ref, rtol=1e-9, atol=1e-9)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("write_rule", ["paper", "delta"])
def test_hope_with_the_triton_memories_matches_the_naive_reference(triton_device, write_rule, monkeypatch):
    """memory_impl="triton": HOPE's main memory and its projection memories' writes through their
    Triton kernels (the interpreter on a machine without a GPU), the rest on its ATen path; logits
    and every gradient in float64, under the paper's rule and the default delta rule (with
    key_shift, whose first key is zero)."""
    from nl_lightning.ops.dgd import triton as dgd_triton
    from nl_lightning.ops.projection import triton as projection_triton

    calls = {}
    for module, name in ((dgd_triton, "triton_dgd_memory"), (projection_triton, "triton_projection_memory")):
        original = getattr(module, name)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    overrides = {"n_layer": 1, "d_model": 32, "n_head": 2, "chunk_size": 4, "proj_chunk_size": 4,
                 "write_rule": write_rule}  # fmt: skip
    assert_matches_the_naive_reference(Hope, overrides, "triton", triton_device)
    assert calls == {"triton_dgd_memory": 1, "triton_projection_memory": 1}  # one layer, one forward


def test_titans_with_the_triton_delta_rule_memory_matches_the_naive_reference(triton_device):
    """memory_impl="triton" with Titans' delta-rule MLP memory (the DGD op's Triton kernels)."""
    overrides = {"n_layer": 2, "d_model": 32, "n_head": 2, "chunk_size": 4, "memory_kind": "mlp", "write_rule": "delta"}
    assert_matches_the_naive_reference(Titans, overrides, "triton", triton_device)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("setting", ["bfloat16 model", "autocast"])
def test_cpu_kernels_in_half_precision_match_the_aten_path(family, setting):
    """The fused kernels compute in float32 and hand back the dtype the ATen path would."""
    aten = small_model(family, memory_impl="chunk")
    fused = small_model(family, memory_impl="cpu")
    tokens = torch.randint(0, 256, (2, 20))
    logits = []
    for model in (aten, fused):
        if setting == "bfloat16 model":
            logits.append(model.bfloat16()(tokens))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits.append(model(tokens))
    assert logits[1].dtype == logits[0].dtype and torch.isfinite(logits[1]).all()
    torch.testing.assert_close(logits[1].float(), logits[0].float(), atol=0.1, rtol=0.05)


def test_hope_auto_runs_both_cpu_kernels_on_cpu_and_aten_under_a_dispatch_mode(monkeypatch):
    """memory_impl="auto" (the default) uses the C++ kernels on CPU, and the ATen path while a
    dispatch mode must see every op (here the FLOP counter, which counts the same work either way)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nl_lightning.ops.dgd import cpu as dgd_cpu
    from nl_lightning.ops.projection import cpu as projection_cpu

    calls = {"projection": 0, "memory": 0}

    def counting(original, key):
        def counted(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        return counted

    monkeypatch.setattr(projection_cpu._ProjectionLoop, "apply", counting(projection_cpu._ProjectionLoop.apply, "projection"))
    monkeypatch.setattr(dgd_cpu._MLPChunkLoop, "apply", counting(dgd_cpu._MLPChunkLoop.apply, "memory"))
    model = small_model(Hope, write_rule="paper")  # memory_impl defaults to "auto"
    assert model.config.memory_impl == "auto"
    tokens = torch.randint(0, 256, (2, 20))
    model(tokens).sum().backward()
    assert calls == {"projection": 2, "memory": 2}  # one of each per block
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    assert calls == {"projection": 2, "memory": 2}
    reference = small_model(Hope, memory_impl="chunk", write_rule="paper")
    with FlopCounterMode(display=False) as reference_counter:
        reference(tokens)
    assert counter.get_total_flops() == reference_counter.get_total_flops() > 0


def test_hope_delta_rule_runs_its_projection_updates_through_the_cpu_dgd_kernel(monkeypatch):
    """write_rule="delta": the C++ projection loop (the paper's rule only) is not used; every
    chunk's projection update and the main memory go through the DGD op's C++ MLP kernel."""
    from nl_lightning.ops.dgd import cpu as dgd_cpu
    from nl_lightning.ops.projection import cpu as projection_cpu

    calls = {"projection_loop": 0, "mlp_kernel": 0}
    original_loop, original_kernel = projection_cpu._ProjectionLoop.apply, dgd_cpu._MLPChunkLoop.apply

    def loop(*args, **kwargs):
        calls["projection_loop"] += 1
        return original_loop(*args, **kwargs)

    def kernel(*args):
        calls["mlp_kernel"] += 1
        return original_kernel(*args)

    monkeypatch.setattr(projection_cpu._ProjectionLoop, "apply", loop)
    monkeypatch.setattr(dgd_cpu._MLPChunkLoop, "apply", kernel)
    model = small_model(Hope)  # 2 blocks, projection chunks of 8
    model(torch.randint(0, 256, (2, 20))).sum().backward()
    # per block: the main memory once, the projections after each of the first two of three chunks
    assert calls == {"projection_loop": 0, "mlp_kernel": 2 * (1 + 2)}


def test_hope_projection_memories_stay_finite_over_many_chunks_with_grown_slow_weights():
    """The failure the delta rule's slow-map target fixes: projection memories whose slow weights
    grew (as in a HOPE trained on recall, W2 norm ~300) diverged within their second chunk update
    under the paper's rule; under the delta rule their state stays finite over 16 chunks."""
    torch.manual_seed(0)
    results = {}
    for rule in ("delta", "paper"):
        layer = small_model(Hope, n_layer=1, proj_chunk_size=16, write_rule=rule).blocks[0].mixer
        with torch.no_grad():
            layer.projections[0].mul_(40.0)
            layer.projections[1].mul_(6.0)
            layer.gate_bias["eta"].fill_(12.0)  # the largest step each rule allows
            layer.gate_bias["alpha"].fill_(12.0)
            p = layer.project(F.normalize(torch.randn(2, 256, layer.config.d_model), dim=-1))
        results[rule] = all(torch.isfinite(t).all() for t in p.values())
    assert results == {"delta": True, "paper": False}  # the paper's rule failing shows the setup bites


def test_titans_auto_runs_the_cpu_kernel_on_cpu_and_aten_under_a_dispatch_mode(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from nl_lightning.ops.titans import cpu as cpu_fused

    calls = {"fused": 0}
    original = cpu_fused._TitansChunkLoop.apply

    def counted(*args):
        calls["fused"] += 1
        return original(*args)

    monkeypatch.setattr(cpu_fused._TitansChunkLoop, "apply", counted)
    model = small_model(Titans, write_rule="paper")  # memory_impl defaults to "auto"; 2 layers, the second attention
    assert model.config.memory_impl == "auto"
    tokens = torch.randint(0, 256, (2, 20))
    model(tokens).sum().backward()
    memory_layers = sum(type(block.mixer).__name__ == "TitansMemoryLayer" for block in model.blocks)
    assert memory_layers >= 1 and calls["fused"] == memory_layers
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    assert calls["fused"] == memory_layers and counter.get_total_flops() > 0


def test_titans_delta_rule_auto_runs_the_cpu_dgd_kernel_on_cpu(monkeypatch):
    """write_rule="delta" (the default): Titans' MLP memory goes through the DGD op, whose C++ loop
    implements the rule; the Titans momentum kernel is not called."""
    from nl_lightning.ops.dgd import cpu as dgd_fused
    from nl_lightning.ops.titans import cpu as titans_fused

    calls = {"dgd": 0, "titans": 0}
    for module, cls, key in ((dgd_fused, "_MLPChunkLoop", "dgd"), (titans_fused, "_TitansChunkLoop", "titans")):
        original = getattr(module, cls).apply

        def counted(*args, original=original, key=key):
            calls[key] += 1
            return original(*args)

        monkeypatch.setattr(getattr(module, cls), "apply", counted)
    model = small_model(Titans)
    assert model.config.write_rule == "delta" and model.config.memory_kind == "mlp"
    model(torch.randint(0, 256, (2, 20))).sum().backward()
    assert calls == {"dgd": 1, "titans": 0}


def step_gate(mixer, raw, heads: bool):
    """η of HOPE's main memory per head (``heads``), else the projection memories' η as the mixer
    hands its bias and scale to the projection op, which builds it with ``projection_gates``."""
    if heads:
        return mixer._gate("eta", raw)
    return projection_gates(raw, raw, mixer.projection_gate_bias(), mixer._eta_scale(heads=False))[0]


def test_hope_dgd_max_step_sets_the_memory_step_and_rejects_non_positive_values():
    from nl_lightning.models import ModelConfig

    with pytest.raises(ValueError, match="dgd_max_step must be a positive number, got 0"):
        ModelConfig(dgd_max_step=0)
    torch.manual_seed(0)
    default = Hope("tiny", overrides={"n_layer": 1, "write_rule": "paper"}).blocks[0].mixer
    larger = Hope("tiny", overrides={"n_layer": 1, "dgd_max_step": 32.0, "write_rule": "paper"}).blocks[0].mixer
    raw = torch.randn(2, 16, default.config.d_model)
    for heads in (True, False):  # main-memory heads and the projection memories
        eta_default = step_gate(default, raw, heads)
        eta_larger = step_gate(larger, raw, heads)
        torch.testing.assert_close(eta_larger, 64 * eta_default)
        chunk = default.config.chunk_size if heads else default.config.proj_chunk_size
        assert eta_default.max() <= 0.5 / chunk  # the documented cap: dgd_max_step · σ / C


def test_hope_proj_dgd_max_step_caps_only_the_projection_memories():
    from nl_lightning.models import ModelConfig

    with pytest.raises(ValueError, match="proj_dgd_max_step must be a positive number, got -1"):
        ModelConfig(proj_dgd_max_step=-1)
    torch.manual_seed(0)
    default = Hope("tiny", overrides={"n_layer": 1, "write_rule": "paper"}).blocks[0].mixer
    split = Hope(
        "tiny", overrides={"n_layer": 1, "dgd_max_step": 16.0, "proj_dgd_max_step": 0.5, "write_rule": "paper"}
    ).blocks[0].mixer
    raw = torch.randn(2, 16, default.config.d_model)
    torch.testing.assert_close(step_gate(split, raw, True), 32 * step_gate(default, raw, True))
    torch.testing.assert_close(step_gate(split, raw, False), step_gate(default, raw, False))


def test_hope_delta_rule_step_is_the_gate_itself_without_a_cap():
    """write_rule="delta": the memories' β = σ(·) reaches one-shot sizes (no dgd_max_step, no 1/C),
    the main memory's and the projection memories' alike."""
    torch.manual_seed(0)
    delta = Hope("tiny", overrides={"n_layer": 1, "dgd_max_step": 32.0}).blocks[0].mixer
    paper = Hope("tiny", overrides={"n_layer": 1, "dgd_max_step": 32.0, "write_rule": "paper"}).blocks[0].mixer
    paper.load_state_dict(delta.state_dict())
    raw = 4 * torch.randn(2, 16, delta.config.d_model)
    h = delta.config.n_head
    beta = step_gate(delta, raw, True)
    bias = delta.gate_bias["eta"]
    torch.testing.assert_close(beta, torch.sigmoid(raw.unflatten(-1, (h, -1)).mean(-1).transpose(1, 2) + bias[:h, None]))
    torch.testing.assert_close(step_gate(paper, raw, True), 32 / delta.config.chunk_size * beta)
    torch.testing.assert_close(step_gate(delta, raw, False), torch.sigmoid(raw.mean(-1) + bias[h]))
    torch.testing.assert_close(step_gate(paper, raw, False), 32 / delta.config.proj_chunk_size * step_gate(delta, raw, False))


@pytest.mark.parametrize(("field", "value"), [("write_rule", "nlms"), ("memory_target", "key")])
def test_unknown_write_rule_or_target_is_refused_naming_the_choices(field, value):
    from nl_lightning.models import ModelConfig

    with pytest.raises(ValueError, match=f"{field} must be"):
        ModelConfig(**{field: value})


def test_key_shift_starts_the_keys_from_the_previous_token_and_nothing_else():
    """ModelConfig.key_shift: Titans' key channels of the q/k/v convolution, and HOPE's convolution
    over its key read-outs, start as a one-token shift; queries and values keep the identity."""
    titans = small_model(Titans, key_shift=True).blocks[0].mixer
    d = titans.config.d_model
    x = torch.randn(2, 9, 3 * d)
    y = titans.conv(x)
    torch.testing.assert_close(y[..., d : 2 * d], torch.cat([torch.zeros_like(x[:, :1, :d]), x[:, :-1, d : 2 * d]], 1))
    torch.testing.assert_close(y[..., :d], x[..., :d])
    torch.testing.assert_close(y[..., 2 * d :], x[..., 2 * d :])
    hope = small_model(Hope, key_shift=True).blocks[0].mixer
    keys = torch.randn(2, 9, d)
    torch.testing.assert_close(hope.key_conv(keys)[:, 1:], keys[:, :-1])
    assert small_model(Hope).blocks[0].mixer.key_conv is not None  # on by default
    assert small_model(Hope, key_shift=False).blocks[0].mixer.key_conv is None  # off: the papers' HOPE
    plain = small_model(Titans, key_shift=False).blocks[0].mixer
    torch.testing.assert_close(plain.conv(x)[..., d : 2 * d], x[..., d : 2 * d])  # off: identity, as in the papers


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("rule", ["delta", "paper"])
def test_key_shift_keeps_the_gradients_at_the_scale_of_the_unshifted_model(family, rule):
    """Token 0's shifted key is zero (no previous token) and must pass no gradient: through the
    normalisation of a zero vector and the delta step β/(‖k‖² + ε) it reached 1e13 at initialisation."""
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    largest = {}
    for shift in (False, True):
        model = small_model(family, key_shift=shift, write_rule=rule)
        model(tokens).square().mean().backward()
        largest[shift] = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    assert largest[True] < 10 * largest[False], largest


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_key_shift_keeps_the_models_causal(family):
    model = small_model(family, key_shift=True)
    tokens = torch.randint(0, 256, (2, 30))
    changed = tokens.clone()
    changed[:, 17] = (changed[:, 17] + 5) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :17], before[:, :17])
    assert not torch.allclose(after[:, 17:], before[:, 17:])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"key_shift": "yes"}, "key_shift must be true or false"),
    ({"key_shift": True, "conv_kernel": 1}, "key_shift needs conv_kernel >= 2"),
])
def test_bad_key_shift_settings_are_refused_naming_the_fix(overrides, message):
    from nl_lightning.models import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_proj_reset_every_restarts_the_projection_memories_from_their_slow_weights():
    """ModelConfig.proj_reset_every: the projection read-outs of a segment are those of a sequence
    that starts there (the memories' state is the slow weights again); within the first segment, and
    with no resets, nothing changes."""
    plain = small_model(Hope, proj_chunk_size=8).blocks[0].mixer
    reset = small_model(Hope, proj_chunk_size=8, proj_reset_every=16).blocks[0].mixer
    reset.load_state_dict(plain.state_dict())
    x = F.normalize(torch.randn(2, 40, plain.config.d_model), dim=-1)
    with torch.no_grad():
        ours, theirs = reset.project(x), plain.project(x)
        fresh = plain.project(x[:, 16:32])
    for name in ours:
        torch.testing.assert_close(ours[name][:, :16], theirs[name][:, :16])
        torch.testing.assert_close(ours[name][:, 16:32], fresh[name])
        assert not torch.allclose(ours[name][:, 24:32], theirs[name][:, 24:32])  # the plain state has moved on


@pytest.mark.parametrize("value", [0, 12, True, 16.0])
def test_bad_proj_reset_every_is_refused_naming_the_fix(value):
    from nl_lightning.models import ModelConfig

    with pytest.raises(ValueError, match="proj_reset_every must be None or a positive multiple of proj_chunk_size=8"):
        ModelConfig(proj_chunk_size=8, proj_reset_every=value)


def test_titans_model_runs_the_triton_memory_like_the_chunk_kernel(triton_linear, monkeypatch):
    """``memory_impl="triton"`` reaches the Triton kernel through the model config (interpreter on
    CPU) and gives the chunk kernel's logits and gradients."""
    from nl_lightning.ops.titans import triton as triton_module

    calls = []
    original = triton_module.triton_titans_memory

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_module, "triton_titans_memory", counted)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for impl in ("triton", "chunk"):
        model = small_model(Titans, memory_kind="linear", memory_impl=impl, write_rule="paper").to(device)
        logits = model(tokens)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logits_triton, grads_triton), (logits_chunk, grads_chunk) = results
    assert len(calls) == 1  # one memory layer in the small model (the other is attention)
    torch.testing.assert_close(logits_triton, logits_chunk, rtol=1e-4, atol=1e-5)
    assert grads_triton.keys() == grads_chunk.keys()
    memory_grads = [n for n in grads_chunk if "memory" in n]
    assert memory_grads  # the memory's slow weights are among the compared gradients
    for name, grad in grads_chunk.items():
        torch.testing.assert_close(grads_triton[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@ON_DEVICES
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_autocast_logits_follow_float32_and_gradients_are_finite(family, kind, device):
    model = small_model(family, memory_kind=kind).to(device)
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    expected = model(tokens)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - expected).norm() / expected.norm()
    assert error < 0.02, f"bf16-autocast logits differ from float32 by {error:.3%}"
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class HostValueSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that move values between host and tensor: a Python value made into a tensor
    (``x[i] = 3``, ``torch.tensor(...)``) and a tensor value read on the host (``.item()``,
    ``bool(t)``, also inside torch's own backward formulas). On a GPU the first is a copy from
    pageable memory and the second a sync; a CUDA graph can record neither."""

    def __init__(self):
        super().__init__()
        self.crossings = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default):
            self.crossings.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", [*FAMILIES, TransformerPP], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_step_moves_no_values_between_host_and_tensors(family, kind):
    # 21 tokens: a partial last memory chunk, and more than 2·window for the blocked attention.
    model = small_model(family, memory_kind=kind).train()
    tokens = torch.randint(0, 256, (2, 21))
    with HostValueSpy() as spy:
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
    assert spy.crossings == [], f"{family.__name__}'s training step moves values to or from the host: {spy.crossings}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_training_step_with_the_triton_memories_moves_no_values_between_host_and_tensors(family, triton_device):
    """The same for ``memory_impl="triton"`` (the default delta rule, MLP memory; HOPE's projection
    memories' writes too): the launches
    take their sizes from shapes, never from tensor values, so a step can be recorded as one CUDA
    graph (the interpreter on a machine without a GPU)."""
    model = small_model(family, memory_impl="triton", n_layer=1 if family is Hope else 2).to(triton_device).train()
    tokens = torch.randint(0, 256, (2, 21), device=triton_device)
    with HostValueSpy() as spy:
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
    assert spy.crossings == [], f"{family.__name__}'s Triton training step moves values to or from the host: {spy.crossings}"
