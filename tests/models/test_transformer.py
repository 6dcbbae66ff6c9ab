import pytest
import torch
import torch.nn.functional as F

from nl_lightning.models import PRESETS, ModelConfig, TransformerPP
from nl_lightning.models.layers import (
    CausalSelfAttention,
    apply_rope,
    blocked_sliding_window_attention,
    rope_cos_sin,
    sliding_window_mask,
)


def tiny_model(**overrides) -> TransformerPP:
    torch.manual_seed(0)
    return TransformerPP("tiny", overrides={"n_layer": 2, **overrides})


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = tiny_model().eval()
    tokens = torch.randint(0, 256, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=0)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(64, head_dim, 10_000.0, torch.device("cpu"), torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    torch.testing.assert_close(score(10, 3), score(50, 43))
    torch.testing.assert_close(score(0, 0), q @ k)
    assert not torch.isclose(score(10, 3), score(10, 4))


def test_rope_preserves_norm():
    x = torch.randn(5, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(5, 8, 10_000.0, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_within_ten_percent_of_stated(preset):
    with torch.device("meta"):
        model = TransformerPP(preset)
    stated = model.config.stated_params
    assert abs(model.num_parameters() - stated) <= 0.10 * stated


def test_tiny_preset_is_between_one_and_three_million_parameters():
    assert 1_000_000 <= TransformerPP("tiny").num_parameters() <= 3_000_000


def test_tied_embeddings_share_the_head_weight_and_untied_do_not():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model()
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * tied.config.d_model


def test_logits_shape_and_initial_loss_near_uniform():
    model = tiny_model()
    tokens = torch.randint(0, 256, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 256)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*'tiny'"):
        ModelConfig.from_preset("huge")


def test_unknown_override_names_the_valid_fields():
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['n_layers'\].*n_layer"):
        ModelConfig.from_preset("tiny", n_layers=3)


@pytest.mark.parametrize(
    "overrides, message",
    [({"n_head": 5}, "not divisible by n_head=5"), ({"d_model": 0}, "d_model must be a positive integer")],
)
def test_inconsistent_sizes_raise_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("tiny", **overrides)


def test_tokens_with_wrong_rank_raise():
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        tiny_model()(torch.zeros(16, dtype=torch.long))


@pytest.mark.parametrize(("seq_len", "window"), [(300, 64), (256, 64), (129, 64), (10, 3), (7, 1)])
def test_blocked_sliding_window_attention_equals_the_dense_mask_forward_and_backward(seq_len, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, seq_len, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(seq_len, window, q.device))
    blocked = blocked_sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(blocked, dense, rtol=0, atol=1e-12)
    weights = torch.randn_like(dense)
    expected = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    actual = torch.autograd.grad((blocked * weights).sum(), (q, k, v))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_sliding_window_layer_on_a_long_sequence_matches_the_dense_reference():
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, 10_000.0, window=4).double()
    x = torch.randn(1, 37, 16, dtype=torch.float64)  # > 2 windows: the blocked path
    out = layer(x)
    dense_layer = CausalSelfAttention(16, 2, 10_000.0, window=None).double()
    dense_layer.load_state_dict(layer.state_dict())
    # full causal attention with the window mask applied by hand = the dense reference
    q, k, v = dense_layer.qkv(x).view(1, 37, 3, 2, 8).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin = rope_cos_sin(37, 8, 10_000.0, x.device, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(37, 4, x.device))
    torch.testing.assert_close(out, dense_layer.proj(ref.transpose(1, 2).reshape(1, 37, 16)))
