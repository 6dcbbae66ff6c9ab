import math

import pytest
import torch
from lightning.pytorch import Trainer

from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import TransformerPP
from nl_lightning.modules import LanguageModel


def tiny_lm(**kwargs) -> LanguageModel:
    torch.manual_seed(0)
    overrides = kwargs.pop("overrides", {})
    return LanguageModel(TransformerPP("tiny", overrides={"n_layer": 1, **overrides}), **kwargs)


def test_lr_warms_up_linearly_then_follows_cosine_to_the_floor():
    module = tiny_lm(warmup_steps=10, min_lr_ratio=0.1)
    assert module.lr_factor(0, 110) == pytest.approx(0.1)
    assert module.lr_factor(9, 110) == pytest.approx(1.0)
    assert module.lr_factor(10, 110) == pytest.approx(1.0)
    assert module.lr_factor(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert module.lr_factor(110, 110) == pytest.approx(0.1)
    assert tiny_lm(warmup_steps=0, lr_schedule="constant").lr_factor(50, 110) == 1.0


def test_param_groups_cover_every_parameter_once_and_skip_decay_on_vectors_and_embeddings():
    module = tiny_lm(overrides={"tie_embeddings": True})
    decay, no_decay = module._param_groups()
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.network.parameters()))
    assert no_decay["weight_decay"] == 0.0
    assert id(module.network.embed.weight) in {id(p) for p in no_decay["params"]}
    assert all(p.dim() >= 2 for p in decay["params"])


def test_network_param_groups_keep_their_metadata_and_are_split_by_decay():
    module = tiny_lm()
    params = list(module.network.parameters())
    module.network.param_groups = lambda: [{"params": params[:3], "period": 4, "name": "slow"},
                                           {"params": params[3:], "period": 1}]
    groups = module._param_groups()
    slow = [g for g in groups if g.get("name") == "slow"]
    assert slow and all(g["period"] == 4 for g in slow)
    assert sum(len(g["params"]) for g in slow) == 3
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_custom_optimizer_from_a_callable_is_used(tmp_path, text_dir):
    module = tiny_lm(optimizer=lambda params: torch.optim.SGD(params, lr=0.5), warmup_steps=0, lr_schedule="constant")
    module.trainer = Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5


def test_non_finite_loss_raises_instead_of_training_on(tmp_path, text_dir):
    module = tiny_lm()
    with torch.no_grad():
        module.network.head.weight.fill_(float("nan"))
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=32, batch_size=2, val_fraction=0.3)
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite training loss.*lower the learning rate"):
        trainer.fit(module, data)


def test_data_vocabulary_larger_than_the_model_raises(tmp_path, text_dir):
    module = tiny_lm(overrides={"vocab_size": 128})
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=32, batch_size=2, val_fraction=0.3)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size is 128; set the network's vocab_size to at least 256"):
        trainer.fit(module, data)


def test_validation_metrics_agree_with_each_other(tmp_path, text_dir):
    module = tiny_lm()
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=32, batch_size=2, val_fraction=0.3)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=3,
                      default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, data, verbose=False)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    assert metrics["val/bpb"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-4)
    assert metrics["val/loss"] == pytest.approx(math.log(256), abs=0.1)


def test_validation_at_further_lengths_logs_each_length_by_name(tmp_path, text_dir):
    module = tiny_lm()
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=32, batch_size=4,
                            val_fraction=0.3, val_lengths=[128])
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1,
                      default_root_dir=tmp_path)
    results = trainer.validate(module, data, verbose=False)
    metrics = {k: v for result in results for k, v in result.items()}
    assert {"val/bpb", "val/loss", "val/ppl", "val/bpb@128", "val/loss@128"} <= set(metrics)
    assert not any("dataloader_idx" in name for name in metrics)
    assert metrics["val/bpb@128"] == pytest.approx(metrics["val/loss@128"] / math.log(2), rel=1e-5)
    # each length is scored on its own windows: the network's loss on the first batch of each loader
    for loader, suffix in zip(data.val_dataloader(), ("", "@128")):
        inputs, targets = next(iter(loader))
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(module(inputs).flatten(0, 1), targets.flatten())
        assert metrics[f"val/bpb{suffix}"] == pytest.approx(loss.item() / math.log(2), rel=1e-5)
    assert metrics["val/bpb@128"] != metrics["val/bpb"]


def test_a_non_finite_validation_batch_makes_the_loss_nan_instead_of_being_dropped():
    """MeanMetric's default drops NaN with a warning and would report the finite batches' mean."""
    from nl_lightning.modules.recall import RecallModel

    for loss in (tiny_lm().metrics["val"]["loss"], RecallModel._new_metrics()["loss"]):
        loss.update(torch.tensor(2.0))
        loss.update(torch.tensor(float("nan")))
        assert math.isnan(loss.compute())


@pytest.mark.parametrize("family", ["TransformerPP", "Hope"])
def test_compiled_network_gives_the_eager_logits_and_gradients_under_the_same_names(family):
    # aot_eager traces the network through dynamo and AOT autograd as every backend does (a
    # graph break or an untraceable op would show here) without generating code, so it runs on
    # the CPU in seconds; the GPU backends (inductor, cudagraphs) compile the same graphs.
    from nl_lightning import models

    small = {"n_layer": 1, "chunk_size": 8, "proj_chunk_size": 8}
    graphs = []

    def recording_aot_eager(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    modules = []
    for options in (False, {"backend": recording_aot_eager}):
        torch.manual_seed(0)
        module = LanguageModel(getattr(models, family)("tiny", overrides=small), compile=options)
        module.setup("fit")
        modules.append(module)
    eager, compiled = modules
    assert compiled._network_compiled and not eager._network_compiled
    tokens = torch.randint(0, 256, (2, 21))  # a partial last chunk
    logits = []
    for module in modules:
        out = module(tokens)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens.flatten()).backward()
        logits.append(out)
    assert len(graphs) == 1, f"{family}'s forward broke into {len(graphs)} graphs"
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compile_option_rejects_what_torch_compile_cannot_take():
    with pytest.raises(TypeError, match="compile must be true/false or a dict"):
        tiny_lm(compile="cudagraphs")
