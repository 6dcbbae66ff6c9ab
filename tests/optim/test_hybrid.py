"""Muon and M3: hand-computed first steps, the Newton–Schulz band, routing, the slow momentum's
schedule, level-aware periods, closures, checkpoints, non-finite gradients and DeepSpeed ZeRO."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from nl_lightning.optim import M3, Muon

ROOT = Path(__file__).resolve().parents[2]
A, B, C = 3.4445, -4.7750, 2.0315  # the quintic, written out again so the reference does not share code


def reference_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Five quintic steps in float64 on one matrix, written from the formula."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (torch.sqrt((x * x).sum()) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


def two_by_three_problem(seed: int = 0, steps: int = 3):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    grads = [(torch.randn(2, 3, generator=generator, dtype=torch.float64),
              torch.randn(3, generator=generator, dtype=torch.float64)) for _ in range(steps)]
    return weight, bias, grads


def run_optimizer(make, weight, bias, grads):
    w, b = nn.Parameter(weight.float().clone()), nn.Parameter(bias.float().clone())
    optimizer = make([("layer.weight", w), ("layer.bias", b)])
    history = []
    for gw, gb in grads:
        w.grad, b.grad = gw.float().clone(), gb.float().clone()
        optimizer.step()
        history.append((w.detach().double().clone(), b.detach().double().clone()))
    return history


def reference_adamw(bias, grads, lr, betas, eps, weight_decay):
    m, v, out = torch.zeros_like(bias), torch.zeros_like(bias), []
    for t, (_, g) in enumerate(grads, start=1):
        bias = bias * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        bias = bias - lr * (m / (1 - betas[0] ** t)) / (torch.sqrt(v / (1 - betas[1] ** t)) + eps)
        out.append(bias)
    return out


def test_first_muon_steps_match_a_float64_reference_on_a_2x3_problem():
    weight, bias, grads = two_by_three_problem()
    lr, beta, wd, adamw = 0.1, 0.9, 0.01, dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    got = run_optimizer(lambda p: Muon(p, lr=lr, momentum=beta, weight_decay=wd, adamw_lr=adamw["lr"],
                                       adamw_betas=adamw["betas"], adamw_eps=adamw["eps"]), weight, bias, grads)
    buffer, w = torch.zeros_like(weight), weight
    expected_bias = reference_adamw(bias, grads, weight_decay=wd, **adamw)
    for step, (g, _) in enumerate(grads):
        buffer = beta * buffer + (1 - beta) * g
        nesterov = g + beta * (buffer - g)
        w = w * (1 - lr * wd) - lr * reference_newton_schulz(nesterov) * max(1.0, 2 / 3) ** 0.5
        torch.testing.assert_close(got[step][0], w, rtol=0, atol=2e-6, msg=f"weight after step {step + 1}")
        torch.testing.assert_close(got[step][1], expected_bias[step], rtol=0, atol=2e-6, msg=f"bias after step {step + 1}")


@pytest.mark.parametrize("normalize_update", [True, False])
def test_first_m3_steps_match_a_float64_reference_on_a_2x3_problem(normalize_update):
    weight, bias, grads = two_by_three_problem(seed=1, steps=4)
    lr, (b1, b2, b3), alpha, f, eps = 0.05, (0.9, 0.99, 0.5), 0.5, 2, 1e-8
    got = run_optimizer(lambda p: M3(p, lr=lr, betas=(b1, b2, b3), alpha=alpha, slow_period=f, eps=eps,
                                     normalize_update=normalize_update), weight, bias, grads)
    fast, second, slow, since_slow = (torch.zeros_like(weight) for _ in range(4))
    slow_direction, w = torch.zeros_like(weight), weight
    for t, (g, _) in enumerate(grads, start=1):
        fast, second, since_slow = b1 * fast + g, b2 * second + g * g, since_slow + g
        if t % f == 0:
            slow, since_slow = b3 * slow + since_slow, torch.zeros_like(g)
            slow_direction = reference_newton_schulz(slow)
        direction = reference_newton_schulz(fast) + alpha * slow_direction
        update = direction / torch.sqrt(second + eps)
        if normalize_update:
            update = update * torch.sqrt((direction**2).mean()) / torch.sqrt((update**2).mean())
        w = w - lr * update
        torch.testing.assert_close(got[t - 1][0], w, rtol=0, atol=1e-5, msg=f"weight after step {t}")


# Band: the quintic is tuned for a steep slope at 0, not for convergence to 1, so after 5 steps the
# singular values of a matrix whose own singular values are not tiny relative to its Frobenius norm
# oscillate in about [0.68, 1.14] (float32; bf16 rounding adds a few %). We assert [0.6, 1.25]: tight
# enough to catch a wrong coefficient or a missing normalisation, loose enough for bf16. Random
# rectangular Gaussians are used because their smallest singular value is bounded away from 0
# (Marchenko–Pastur); a near-singular direction would need more than 5 steps to be lifted.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 96, 48)])
def test_newton_schulz_singular_values_land_in_the_quintic_band(shape, dtype):
    from nl_lightning.optim.newton_schulz import newton_schulz

    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == g.dtype
    singular_values = torch.linalg.svdvals(out.double())
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25, singular_values.aminmax()


def test_newton_schulz_refuses_a_vector_and_keeps_zero_at_zero():
    from nl_lightning.optim.newton_schulz import newton_schulz

    with pytest.raises(ValueError, match=r"shape \(5,\).*AdamW"):
        newton_schulz(torch.ones(5))
    assert torch.equal(newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_batched_newton_schulz_equals_the_per_matrix_path():
    from nl_lightning.optim.newton_schulz import newton_schulz, newton_schulz_many

    generator = torch.Generator().manual_seed(0)
    # (48, 96) and (96, 48) share one batch after the tall one is transposed; (2, 96, 48) adds two more.
    shapes = [(48, 96), (96, 48), (2, 96, 48), (32, 32), (5, 7), (32, 32)]
    matrices = [torch.randn(shape, generator=generator) for shape in shapes]
    batched = newton_schulz_many(matrices)
    assert [tuple(out.shape) for out in batched] == shapes
    for matrix, out in zip(matrices, batched):
        single = torch.stack([newton_schulz(m) for m in matrix.reshape(-1, *matrix.shape[-2:])]).reshape(matrix.shape)
        torch.testing.assert_close(out, single, rtol=0, atol=1e-6)
    bf16 = newton_schulz_many([m.bfloat16() for m in matrices[:3]], dtype="bfloat16")
    assert all(out.dtype == torch.bfloat16 for out in bf16)


@pytest.mark.parametrize("optimizer_cls", [Muon, M3])
def test_one_optimizer_over_many_matrices_steps_each_as_if_it_were_alone(optimizer_cls):
    """The batched step (one Newton–Schulz per shape, foreach updates) equals one optimizer per parameter."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (12, 8), "b.weight": (8, 12), "c.stacked": (3, 12, 8), "d.weight": (12, 8), "e.bias": (8,)}
    together = {n: nn.Parameter(torch.randn(s, generator=generator)) for n, s in shapes.items()}
    alone = {n: nn.Parameter(p.detach().clone()) for n, p in together.items()}
    options = dict(weight_decay=0.1) if optimizer_cls is Muon else dict(weight_decay=0.1, slow_period=2)
    batched = optimizer_cls(list(together.items()), **options)
    singles = [optimizer_cls([(n, p)], **options) for n, p in alone.items()]
    for step in range(4):
        for name in shapes:
            grad = torch.randn(shapes[name], generator=generator)
            together[name].grad, alone[name].grad = grad.clone(), grad.clone()
        batched.step()
        for optimizer in singles:
            optimizer.step()
        for name in shapes:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-6, msg=f"{name} after step {step + 1}")


def test_ns_dtype_sets_the_newton_schulz_precision_and_refuses_unknown_names():
    from nl_lightning.optim.newton_schulz import newton_schulz

    update = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for ns_dtype, dtype in (("bfloat16", torch.bfloat16), (None, torch.float32)):  # None on a CPU → float32
        weight = nn.Parameter(torch.zeros(6, 10))
        optimizer = Muon([("w", weight)], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=ns_dtype)
        weight.grad = update.clone()
        optimizer.step()
        torch.testing.assert_close(weight.detach(), -newton_schulz(update, dtype=dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ns_dtype = 'bf16'.*'bfloat16'"):
        M3([("w", nn.Parameter(torch.zeros(4, 4)))], ns_dtype="bf16")


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 6, 3, groups=6, bias=False)  # weight (6, 1, 3): a dimension of 1
        self.stacked = nn.Parameter(torch.randn(2, 6, 3))  # per-head matrices
        self.head = nn.Linear(6, 10, bias=False)


@pytest.mark.parametrize("optimizer_cls", [Muon, M3])
def test_routing_sends_embedding_head_vectors_and_unit_dims_to_adamw_and_matrices_to_newton_schulz(optimizer_cls):
    optimizer = optimizer_cls(list(Routed().named_parameters()))
    routed = {name: group["orthogonal"] for group in optimizer.param_groups for name in group["param_names"]}
    assert {name for name, orthogonal in routed.items() if orthogonal} == {"hidden.weight", "stacked"}
    assert len(routed) == len(list(Routed().parameters()))
    assert {g["lr"] for g in optimizer.param_groups if not g["orthogonal"]} == {3e-3}


def test_language_model_groups_carry_names_so_hope_embedding_and_head_go_to_adamw():
    from nl_lightning.models import Hope
    from nl_lightning.modules import LanguageModel

    module = LanguageModel(Hope(preset="tiny"))
    optimizer = Muon(module._param_groups())
    adamw = {n for g in optimizer.param_groups if not g["orthogonal"] for n in g["param_names"]}
    orthogonal = {n for g in optimizer.param_groups if g["orthogonal"] for n in g["param_names"]}
    assert {"embed.weight", "head.weight", "blocks.0.mixer.conv.conv.weight"} <= adamw
    assert {"blocks.0.mixer.memory.0", "blocks.0.mixer.projections.0", "blocks.0.cms.levels.2.mlp.up.weight"} <= orthogonal
    assert {g["period"] for g in optimizer.param_groups if g["name"] == "cms.2"} == {16}


def test_unnamed_matrices_warn_that_embeddings_cannot_be_recognised():
    with pytest.warns(UserWarning, match="without names"):
        Muon([nn.Parameter(torch.randn(4, 4))])


def test_explicit_orthogonal_flag_on_a_group_overrides_the_routing():
    weight = nn.Parameter(torch.randn(4, 4))
    optimizer = M3([{"params": [weight], "orthogonal": False}])
    assert optimizer.param_groups[0]["orthogonal"] is False and optimizer.param_groups[0]["lr"] == 3e-3
    with pytest.raises(ValueError, match=r"shapes \[\(4,\)\].*'orthogonal': False"):
        Muon([{"params": [nn.Parameter(torch.zeros(4))], "orthogonal": True}])


def test_m3_slow_momentum_changes_only_every_slow_period_steps():
    weight = nn.Parameter(torch.randn(5, 4))
    optimizer = M3([("w", weight)], slow_period=3)
    changed, previous = [], torch.zeros(5, 4)
    for step in range(1, 10):
        weight.grad = torch.randn(5, 4)
        optimizer.step()
        slow = optimizer.state[weight]["slow"]
        if not torch.equal(slow, previous):
            changed.append(step)
        previous = slow.clone()
    assert changed == [3, 6, 9]


def random_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def make_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 4), "b.stacked": (2, 4, 3), "c.bias": (5,), "slow.weight": (4, 4)}
    return {name: nn.Parameter(torch.randn(shape, generator=generator)) for name, shape in shapes.items()}


def make_groups(params):
    fast = [(n, p) for n, p in params.items() if not n.startswith("slow")]
    return [{"params": fast, "name": "fast"}, {"params": [("slow.weight", params["slow.weight"])], "name": "slow", "period": 2}]


@pytest.mark.parametrize("make", [lambda g: Muon(g, weight_decay=0.1), lambda g: M3(g, slow_period=3, weight_decay=0.1)],
                         ids=["muon", "m3"])
def test_state_dict_round_trip_continues_bit_identically(make):
    params = make_params()
    optimizer = make(make_groups(params))
    for step in range(3):  # mid-cycle for the period-2 group and for M3's slow momentum
        random_grads(params.values(), seed=step)
        optimizer.step()
    saved_state = copy.deepcopy(optimizer.state_dict())
    resumed_params = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    resumed = make(make_groups(resumed_params))
    resumed.load_state_dict(saved_state)
    for step in range(3, 8):
        for ps, opt in ((params, optimizer), (resumed_params, resumed)):
            random_grads(ps.values(), seed=step)
            opt.step()
    for name in params:
        assert torch.equal(params[name], resumed_params[name]), name


@pytest.mark.parametrize("optimizer_cls", [Muon, M3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_naming_the_parameter_and_updates_nothing(optimizer_cls, bad):
    params = make_params()
    optimizer = optimizer_cls([(n, p) for n, p in params.items()])
    before = {n: p.detach().clone() for n, p in params.items()}
    random_grads(params.values(), seed=0)
    params["b.stacked"].grad[1, 2, 0] = bad
    with pytest.raises(FloatingPointError, match="'b.stacked'.*nothing was updated"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert not optimizer.state


@pytest.mark.parametrize("optimizer_cls", [Muon, M3])
def test_group_period_updates_only_every_period_steps_with_the_summed_gradient(optimizer_cls):
    params = make_params()
    optimizer = optimizer_cls(make_groups(params))
    slow, changed, grad_sum = params["slow.weight"], [], torch.zeros(4, 4)
    for step in range(1, 7):
        previous = slow.detach().clone()
        random_grads(params.values(), seed=step)
        grad_sum += slow.grad
        optimizer.step()
        if not torch.equal(slow, previous):
            changed.append(step)
        if step == 2:
            state = optimizer.state[slow]
            momentum = state["momentum_buffer"] if optimizer_cls is Muon else state["fast"]
            scale = (1 - optimizer.param_groups[-1].get("momentum", 0.0)) if optimizer_cls is Muon else 1.0
            torch.testing.assert_close(momentum, scale * grad_sum)
    assert changed == [2, 4, 6]
    assert optimizer.level_stats()["slow/updates"] == 3.0


@pytest.mark.parametrize("optimizer_cls", [Muon, M3])
def test_closure_is_evaluated_and_its_loss_returned(optimizer_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = optimizer_cls(list(model.named_parameters()), lr=0.05, adamw_lr=0.01)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])  # learnable, so the loss must fall

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [optimizer.step(closure).item() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]


def test_pure_division_by_root_v_blows_up_where_normalised_m3_does_not():
    """Small gradients: O stays O(1/sqrt(fan-in)) but √V = |g|, so O/√V is huge."""
    steps = {}
    for normalize in (False, True):
        weight = nn.Parameter(torch.zeros(16, 16))
        optimizer = M3([("w", weight)], lr=0.02, normalize_update=normalize)
        weight.grad = 1e-4 * torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        optimizer.step()
        steps[normalize] = weight.detach().abs().max().item() / 0.02
    assert steps[False] > 1000  # the first plain step moves a weight by > 1000·lr
    assert steps[True] < 2  # normalised: the step has the RMS of O (≈ 1/4 here) and a bounded max


def test_adamw_half_matches_torch_adamw():
    generator = torch.Generator().manual_seed(0)
    ours, theirs = (nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(1))) for _ in range(2))
    muon = Muon([("norm.weight", ours)], adamw_lr=0.01, weight_decay=0.1)
    adamw = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(7, generator=generator)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        adamw.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


# -- DeepSpeed ZeRO on 2 CPU processes ----------------------------------------------------------------

WORKER = textwrap.dedent('''
    import sys

    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch import nn
    from torch.utils.data import DataLoader

    from nl_lightning.optim import M3, Muon


    def global_batch(step):
        generator = torch.Generator().manual_seed(step)
        return torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)


    class TinyRegression(LightningModule):
        def __init__(self, optimizer):
            super().__init__()
            torch.manual_seed(0)
            self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
            self.optimizer_name = optimizer

        def training_step(self, batch, batch_idx):
            x, y = global_batch(self.global_step)
            rank, world = self.global_rank, self.trainer.world_size
            return F.mse_loss(self.out(torch.tanh(self.hidden(x[rank::world]))), y[rank::world])

        def train_dataloader(self):
            return DataLoader(range(10_000), batch_size=1)

        def configure_optimizers(self):
            return {"muon": Muon, "m3": M3}[self.optimizer_name](list(self.named_parameters()), lr=0.02)


    class Final(Callback):
        def on_train_end(self, trainer, pl_module):
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


    def train(stage, devices, steps, optimizer):
        final = Final()
        options = dict(accelerator="cpu", devices=devices, max_steps=steps, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, callbacks=[final])
        if stage >= 0:
            from nl_lightning.strategies import CPUDeepSpeedStrategy

            options["strategy"] = CPUDeepSpeedStrategy(stage=stage)
        trainer = Trainer(**options)
        trainer.fit(TinyRegression(optimizer))
        return trainer, final.params


    if __name__ == "__main__":
        stage, steps, optimizer, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
        try:
            trainer, params = train(stage, 2, steps, optimizer)
        except Exception as error:  # the message is what the test checks
            with open(out + ".error", "w") as file:
                file.write(f"{type(error).__name__}: {error}")
            raise
        if trainer.is_global_zero:
            torch.save(params, out)
''')


def run_worker(tmp_path: Path, stage: int, optimizer: str, steps: int = 2):
    script, out = tmp_path / "muon_worker.py", tmp_path / f"zero{stage}.pt"
    script.write_text(WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(stage), str(steps), optimizer, str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


# ~15 s on a quiet 2-core machine (two Python starts + DeepSpeed's setup), like tests/strategies/test_cpu_deepspeed.py.
@pytest.mark.parametrize("optimizer", ["muon", pytest.param("m3", marks=pytest.mark.slow)])
def test_zero_stage_2_refuses_with_an_error_naming_the_stages_that_work(tmp_path, optimizer):
    pytest.importorskip("deepspeed")
    proc, out = run_worker(tmp_path, stage=2, optimizer=optimizer, steps=1)
    assert proc.returncode != 0
    message = Path(str(out) + ".error").read_text()
    assert "ZeRO stages 1, 2 and 3 hand the optimizer flat 1-D partitions" in message
    assert "stage 0" in message and "'hidden.weight'" in message


@pytest.mark.slow  # another 2-process DeepSpeed start
def test_zero_stage_0_keeps_shapes_and_matches_plain_training(tmp_path):
    pytest.importorskip("deepspeed")
    proc, out = run_worker(tmp_path, stage=0, optimizer="m3", steps=3)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(out)
    script = tmp_path / "muon_worker.py"
    sys.path.insert(0, str(tmp_path))
    try:
        import muon_worker

        _, plain = muon_worker.train(-1, 1, 3, "m3")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("muon_worker", None)
    assert script.exists()
    for name, value in plain.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
