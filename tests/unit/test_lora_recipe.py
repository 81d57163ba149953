"""The MemoRa LoRA recipe and training loop on a toy denoiser (torch only, no ComfyUI)."""

import math

import pytest
import torch

from memora.lora import recipe as R
from memora.lora import train as T


# -- a toy denoiser with SD-style layer names -------------------------------------------------------------------
class _Attention(torch.nn.Module):
    def __init__(self, dim, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out[0](w @ v)


class _Block(torch.nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = _Attention(dim)
        self.attn2 = _Attention(dim, context_dim)
        self.ff = torch.nn.Module()
        self.ff.net = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Dropout(0.0), torch.nn.Linear(2 * dim, dim)])
        self.ff.net[0].proj = torch.nn.Linear(dim, 2 * dim)

    def forward(self, x, context):
        x = x + self.attn1(x)
        x = x + self.attn2(x, context)
        return x + self.ff.net[2](torch.nn.functional.gelu(self.ff.net[0].proj(x)))


class ToyDenoiser(torch.nn.Module):
    """latent [B, 4, H, W] + timestep + context [B, L, 8] -> [B, 4, H, W]; 2 transformer blocks with
    16 attention projections, 4 feed-forward layers, and conv_in / time / conv_out."""

    def __init__(self, dim=16, context_dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(4, dim, 3, padding=1)
        self.time = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList([_Block(dim, context_dim) for _ in range(2)])
        self.conv_out = torch.nn.Conv2d(dim, 4, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, x, t, context):
        b, _, h, w = x.shape
        y = self.conv_in(x) + self.time((t.float() / 1000.0).view(-1, 1))[:, :, None, None]
        tok = y.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            tok = blk(tok, context)
        return self.conv_out(tok.transpose(1, 2).reshape(b, -1, h, w))


def _setup(recipe, n=4, seed_data=1, prediction_type=T.EPSILON):
    model = ToyDenoiser()
    g = torch.Generator().manual_seed(seed_data)
    latents = torch.randn(n, 4, 4, 4, generator=g)
    context = torch.randn(1, 3, 8, generator=g)
    schedule = T.DiffusionSchedule(_sd_alphas(), prediction_type)
    shapes = T.find_target_layers(model, recipe.targets)
    gen = torch.Generator().manual_seed(recipe.seed)
    layers = T.create_lora_layers(shapes, recipe, gen)

    def predict(x_t, t, cond):
        return model(x_t, t, cond.expand(x_t.shape[0], -1, -1))

    return model, latents, context, schedule, layers, gen, predict


def _sd_alphas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _train(recipe, **kw):
    model, latents, context, schedule, layers, gen, predict = _setup(recipe, **kw)
    with T.attach_lora(model, layers):
        res = T.train_lora(predict, latents, layers, recipe, schedule, gen, cond=context)
    return res, layers, (model, latents, context, schedule, predict)


# -- recipe --------------------------------------------------------------------------------------------------------
def test_defaults_are_the_reference_recipe():
    r = R.LoRARecipe()
    assert (r.steps, r.rank, r.alpha, r.learning_rate, r.lr_schedule) == (500, 4, 4.0, 1e-4, "cosine")
    assert (r.betas, r.weight_decay, r.adam_eps, r.max_grad_norm) == ((0.9, 0.999), 1e-2, 1e-8, 1.0)
    assert (r.batch_size, r.gradient_accumulation, r.random_flip, r.flip_probability) == (1, 4, True, 0.5)
    assert (r.targets, r.seed, r.scale, r.init_std, r.samples_per_update) == ("attention", 2024, 1.0, 0.25, 4)
    assert '"rank": 4' in r.to_json()


@pytest.mark.parametrize("kw, msg", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(gradient_accumulation=0), "gradient_accumulation"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(alpha=0.0), "alpha"), (dict(lr_schedule="linear"), "lr_schedule"), (dict(targets="mlp"), "targets"),
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(flip_probability=1.5), "flip_probability"),
])
def test_bad_recipe_values_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        R.LoRARecipe(**kw).validate()


def test_target_selection_on_ldm_and_diffusers_names():
    att = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_out.0",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    ff = ["output_blocks.3.1.transformer_blocks.0.ff.net.0.proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    other = ["input_blocks.1.0.in_layers.2", "conv_in", "input_blocks.1.1.proj_in", "time_embed.0"]
    for name in att:
        assert R.is_target(name, "linear", "attention")
    for name in ff:
        assert not R.is_target(name, "linear", "attention") and R.is_target(name, "linear", "attention+feedforward")
    for name in other:
        assert not R.is_target(name, "conv", "attention+feedforward") and R.is_target(name, "conv", "all linear+conv")
    assert not R.is_target("x.attn1.to_out.1", "linear", "attention")
    assert not R.is_target("norm", None, "all linear+conv")


def _sd1_attention_shapes():
    """Weight shapes of every attention projection of the SD1.x UNet (context 768; 16 transformers)."""
    shapes = []
    widths = [320] * 5 + [640] * 5 + [1280] * 6  # down 2+2+2, up 3+3+3, middle 1 -> per width: 5, 5, 6
    for c in widths:
        shapes += [(c, c)] * 4                       # attn1 q k v out
        shapes += [(c, c), (c, 768), (c, 768), (c, c)]  # attn2 q k v out
    return shapes


def test_parameter_count_formula_sd1x_and_toy():
    shapes = _sd1_attention_shapes()
    assert len(shapes) == 128
    assert R.lora_parameter_count(shapes, 4) == 797_184
    toy = ToyDenoiser()
    for targets, n_layers in (("attention", 16), ("attention+feedforward", 20), ("all linear+conv", 23)):
        found = T.find_target_layers(toy, targets)
        assert len(found) == n_layers, (targets, sorted(found))
        layers = T.create_lora_layers(found, R.LoRARecipe(rank=3), torch.Generator().manual_seed(0))
        assert sum(p.num_params for p in layers.values()) == R.lora_parameter_count(found.values(), 3)
    assert R.lora_shapes((64, 32, 3, 3), 4) == ((4, 32, 3, 3), (64, 4, 1, 1))


def test_lr_at_follows_cosine_and_constant():
    r = R.LoRARecipe(steps=10, learning_rate=2e-4)
    for k in range(10):
        assert r.lr_at(k) == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * k / 10)), rel=1e-12)
    assert r.lr_at(0) == 2e-4 and r.lr_at(10) == pytest.approx(0.0, abs=1e-20)
    c = R.LoRARecipe(steps=10, learning_rate=2e-4, lr_schedule="constant")
    assert all(c.lr_at(k) == 2e-4 for k in range(10))


# -- LoRA layers ---------------------------------------------------------------------------------------------------
def test_init_is_gaussian_down_zero_up_and_changes_nothing():
    recipe = R.LoRARecipe(rank=4, targets="attention")
    model, latents, context, schedule, layers, gen, predict = _setup(recipe)
    downs = torch.cat([layer.down.detach().flatten() for layer in layers.values()])
    assert abs(float(downs.std()) - 0.25) < 0.02 and abs(float(downs.mean())) < 0.02
    assert all(float(layer.up.detach().abs().max()) == 0.0 for layer in layers.values())
    assert all(float(layer.delta().detach().abs().max()) == 0.0 for layer in layers.values())
    t = torch.tensor([10, 500, 999, 3])
    before = predict(latents, t, context)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with T.attach_lora(model, layers):
        during = predict(latents, t, context)
    # same weights (W + 0); the autograd-enabled kernels may round differently in the last bit
    assert torch.allclose(before, during, atol=1e-6, rtol=0)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_attach_lora_adds_the_delta_and_restores_the_weights_exactly():
    recipe = R.LoRARecipe(rank=2, alpha=3.0)
    model = ToyDenoiser()
    layers = T.create_lora_layers(T.find_target_layers(model, "attention"), recipe, torch.Generator().manual_seed(5))
    with torch.no_grad():
        for layer in layers.values():
            layer.up.normal_()
    w0 = model.blocks[0].attn2.to_k.weight.detach().clone()
    lay = layers["blocks.0.attn2.to_k"]
    with T.attach_lora(model, layers):
        w = model.blocks[0].attn2.to_k.weight
        expected = w0 + 1.5 * lay.up.detach() @ lay.down.detach()
        assert torch.allclose(w, expected, atol=1e-6)
        w.sum().backward()
    assert lay.down.grad is not None and lay.up.grad is not None
    assert torch.equal(model.blocks[0].attn2.to_k.weight, w0)
    assert not hasattr(model.blocks[0].attn2.to_k, "parametrizations")


def test_conv_lora_delta_has_the_kohya_layout():
    g = torch.Generator().manual_seed(0)
    layer = T.LoRALayerParams((6, 5, 3, 3), rank=2, alpha=1.0, generator=g)
    with torch.no_grad():
        layer.up.normal_(generator=g)
    assert layer.down.shape == (2, 5, 3, 3) and layer.up.shape == (6, 2, 1, 1)
    ref = (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(6, 5, 3, 3) * 0.5
    assert torch.allclose(layer.delta(), ref)
    kohya = layer.to_layer()
    assert torch.allclose(kohya.delta(), ref, atol=1e-6) and kohya.alpha == 1.0


# -- objective -----------------------------------------------------------------------------------------------------
def test_v_prediction_target_is_the_velocity():
    sched = T.DiffusionSchedule(_sd_alphas(), T.V_PREDICTION)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 400, 999])
    x_t, v = sched.add_noise(x0, eps, t), sched.target(x0, eps, t)
    ab = _sd_alphas()[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)
    # x0 and eps are recovered from (x_t, v): the velocity parametrisation
    assert torch.allclose(ab.sqrt() * x_t - (1 - ab).sqrt() * v, x0, atol=1e-5)
    assert torch.equal(T.DiffusionSchedule(_sd_alphas()).target(x0, eps, t), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        T.DiffusionSchedule(_sd_alphas(), "sample")


def test_flipped_copies_prepared_once_and_drawn_per_sample():
    x = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).view(2, 4, 2, 3)
    data = T.prepare_dataset(x, True)
    assert data.shape == (4, 4, 2, 3) and torch.equal(data[2:], x.flip(-1)) and torch.equal(data[:2], x)
    assert T.prepare_dataset(x, False).shape == (2, 4, 2, 3)
    g = torch.Generator().manual_seed(0)
    order = T.SampleOrder(2, g)
    all_flip = T.draw_update(order, g, 8, (4, 2, 3), R.LoRARecipe(flip_probability=1.0), 1000)
    assert all_flip.flips.all()
    no_flip = T.draw_update(order, g, 8, (4, 2, 3), R.LoRARecipe(random_flip=False), 1000)
    assert not no_flip.flips.any()
    half = T.draw_update(order, g, 4000, (1,), R.LoRARecipe(), 1000)
    assert 0.45 < float(half.flips.float().mean()) < 0.55
    assert int(half.timesteps.min()) == 0 and int(half.timesteps.max()) == 999


def test_sample_order_is_one_permutation_per_epoch():
    g = torch.Generator().manual_seed(3)
    order = T.SampleOrder(5, g)
    seq = order.take(12)
    assert sorted(seq[:5].tolist()) == list(range(5)) and sorted(seq[5:10].tolist()) == list(range(5))
    assert order.epochs == 3


# -- optimisation --------------------------------------------------------------------------------------------------
def test_clip_gradients_clips_to_one_and_reports_the_norm_before():
    p1, p2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    p1.grad = torch.full((3,), 4.0)
    p2.grad = torch.full((4,), 3.0)
    before = math.sqrt(3 * 16 + 4 * 9)
    assert T.clip_gradients([p1, p2], 1.0) == pytest.approx(before, rel=1e-6)
    after = math.sqrt(float(p1.grad.pow(2).sum() + p2.grad.pow(2).sum()))
    assert after == pytest.approx(1.0, rel=1e-5)
    p1.grad = torch.full((3,), 0.1)
    p2.grad = torch.full((4,), 0.1)
    T.clip_gradients([p1, p2], 1.0)
    assert torch.equal(p1.grad, torch.full((3,), 0.1))  # below the threshold: untouched


def test_optimizer_is_adamw_with_the_recipe_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    opt, impl = T.make_optimizer([p], R.LoRARecipe())
    assert isinstance(opt, torch.optim.AdamW) and impl in ("fused", "foreach", "for-loop", "default")
    grp = opt.param_groups[0]
    assert (grp["lr"], grp["betas"], grp["eps"], grp["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 1e-2)
    print(f"AdamW implementation on CPU: {impl}")


def test_training_uses_the_cosine_lr_at_every_update_and_clips():
    recipe = R.LoRARecipe(steps=6, learning_rate=5e-3, gradient_accumulation=2, max_grad_norm=1e-3)
    res, layers, _ = _train(recipe)
    assert len(res.lrs) == len(res.losses) == 6 and res.micro_steps == 12
    for k, lr in enumerate(res.lrs):
        assert lr == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)), rel=1e-12)
    assert all(n > 1e-3 for n in res.grad_norms)  # every update was clipped at this threshold


def test_training_applies_the_lr_and_clipping_it_reports():
    """One update replayed by hand: AdamW (decoupled weight decay) with the update's lr on the clipped gradient."""
    recipe = R.LoRARecipe(steps=1, learning_rate=3e-3, max_grad_norm=0.5, rank=2, gradient_accumulation=2)
    model, latents, context, schedule, layers, gen, predict = _setup(recipe)
    init = {k: (v.down.detach().clone(), v.up.detach().clone()) for k, v in layers.items()}
    # gradients are cleared at the end of training: replay the same draws on a twin to read them
    with T.attach_lora(model, layers):
        res = T.train_lora(predict, latents, layers, recipe, schedule, gen, cond=context)
    model2, latents2, context2, schedule2, layers2, gen2, predict2 = _setup(recipe)
    order = T.SampleOrder(latents2.shape[0], gen2)
    d = T.draw_update(order, gen2, 2, tuple(latents2.shape[1:]), recipe, 1000)
    data = T.prepare_dataset(latents2, True)
    x0 = data[d.indices + 4 * d.flips.long()]
    with T.attach_lora(model2, layers2):
        total = 0
        for m in range(2):
            sl = slice(m, m + 1)
            out = predict2(schedule2.add_noise(x0[sl], d.noise[sl], d.timesteps[sl]), d.timesteps[sl], context2)
            total = total + torch.nn.functional.mse_loss(out, d.noise[sl]) / 2
        total.backward()
    params = T.lora_parameters(layers2)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert norm == pytest.approx(res.grad_norms[0], rel=1e-5)
    assert res.losses[0] == pytest.approx(float(total.detach()), rel=1e-5)
    coef = min(1.0, 0.5 / (norm + 1e-6))
    lr, eps = 3e-3, 1e-8
    for name in sorted(layers):
        for i, p in enumerate(T.lora_parameters({name: layers2[name]})):
            g = p.grad * coef
            # Adam step 1: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps); decay lr * wd * p first
            expected = init[name][i] * (1 - lr * 1e-2) - lr * g / (g.abs() + eps)
            got = (layers[name].down, layers[name].up)[i].detach()
            assert torch.allclose(got, expected, atol=1e-7), name


def test_gradient_accumulation_equals_the_big_batch():
    small, lay_a, _ = _train(R.LoRARecipe(steps=3, learning_rate=1e-3, batch_size=1, gradient_accumulation=4))
    big, lay_b, _ = _train(R.LoRARecipe(steps=3, learning_rate=1e-3, batch_size=4, gradient_accumulation=1))
    assert small.micro_steps == 12 and big.micro_steps == 3
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    assert small.grad_norms == pytest.approx(big.grad_norms, rel=1e-4)
    for name in lay_a:
        assert torch.allclose(lay_a[name].up, lay_b[name].up, atol=1e-6, rtol=1e-4), name
        assert torch.allclose(lay_a[name].down, lay_b[name].down, atol=1e-6, rtol=1e-4), name


def test_same_seed_bit_identical_other_seed_different():
    r = R.LoRARecipe(steps=4, learning_rate=1e-3, batch_size=2, gradient_accumulation=2)
    a, la, _ = _train(r)
    b, lb, _ = _train(r)
    c, lc, _ = _train(R.LoRARecipe(steps=4, learning_rate=1e-3, batch_size=2, gradient_accumulation=2, seed=7))
    assert a.losses == b.losses
    assert all(torch.equal(la[k].up, lb[k].up) and torch.equal(la[k].down, lb[k].down) for k in la)
    assert not all(torch.equal(la[k].up, lc[k].up) for k in la)


def test_training_reduces_the_loss_on_the_training_latents():
    recipe = R.LoRARecipe(steps=80, learning_rate=1e-2, batch_size=4, gradient_accumulation=1, rank=4,
                          targets="attention+feedforward", random_flip=False)
    model, latents, context, schedule, layers, gen, predict = _setup(recipe, n=4)
    before = T.evaluate_loss(predict, latents, schedule, cond=context, repeats=16)
    with T.attach_lora(model, layers):
        res = T.train_lora(predict, latents, layers, recipe, schedule, gen, cond=context)
        after = T.evaluate_loss(predict, latents, schedule, cond=context, repeats=16)
    print(f"toy epsilon loss on the training latents: untrained {before:.4f} -> trained {after:.4f} "
          f"(ratio {after / before:.3f}); first/last update loss {res.losses[0]:.4f}/{res.losses[-1]:.4f}")
    assert after < 0.8 * before


def test_v_prediction_training_runs_on_the_velocity_objective():
    recipe = R.LoRARecipe(steps=2, learning_rate=1e-3)
    res, _, _ = _train(recipe, prediction_type=T.V_PREDICTION)
    assert len(res.losses) == 2 and all(math.isfinite(v) for v in res.losses)


def test_cancel_from_the_micro_step_hook_stops_at_once():
    recipe = R.LoRARecipe(steps=5, gradient_accumulation=3)
    model, latents, context, schedule, layers, gen, predict = _setup(recipe)
    seen = []

    class Cancelled(BaseException):
        pass

    def hook(update, micro):
        seen.append((update, micro))
        if (update, micro) == (1, 1):
            raise Cancelled()

    with pytest.raises(Cancelled):
        with T.attach_lora(model, layers):
            T.train_lora(predict, latents, layers, recipe, schedule, gen, cond=context, on_micro_step=hook)
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert not hasattr(model.blocks[0].attn1.to_q, "parametrizations")


def test_bf16_autocast_keeps_lora_parameters_fp32():
    recipe = R.LoRARecipe(steps=2, learning_rate=1e-3)
    model, latents, context, schedule, layers, gen, predict = _setup(recipe)
    with T.attach_lora(model, layers):
        res = T.train_lora(predict, latents, layers, recipe, schedule, gen, cond=context, compute_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in res.losses)
    assert all(p.dtype == torch.float32 for p in T.lora_parameters(layers))
