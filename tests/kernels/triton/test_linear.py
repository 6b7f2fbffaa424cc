"""The quantized-linear entry point: backend switch, Triton path vs reference (outputs, gradients, stats), fallbacks,
memory saved for backward, the QuantLinear layer and a few training steps with either backend.

Runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) or on CUDA when present.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels import linear
from bitlaw.kernels.linear import (
    BACKEND_ENV,
    quantized_linear,
    resolve_backend,
    saved_bytes_per_linear,
    saved_tensor_bytes,
    triton_unsupported_reason,
)
from bitlaw.kernels.quantizers import reference_linear
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.kernels.triton.common import INTERPRETED
from bitlaw.models.quant_linear import QuantLinear
from tests.helpers import compose_train, small_overrides, train_losses, word_corpus

from .test_quant import boundary_free

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def triton_calls(monkeypatch) -> list[str]:
    """Records the recipe name of every call that takes the Triton path."""
    calls: list[str] = []
    original = linear._triton_linear

    def spy(x, weight, recipe, bias, stats, grad_seed):
        calls.append(recipe.name)
        return original(x, weight, recipe, bias, stats, grad_seed)

    monkeypatch.setattr(linear, "_triton_linear", spy)
    return calls


def test_backend_switch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, "cpu") == "reference" and resolve_backend(None, "cuda") == "triton"
    assert resolve_backend("triton", "cpu") == "triton" and resolve_backend("reference", "cuda") == "reference"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(None, "cpu") == "triton"
    assert resolve_backend("reference", "cpu") == "reference"  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(None, "cpu") == "reference"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=r"backend 'cuda' \(from \$BITLAW_BACKEND\) is not allowed; allowed: auto, "
                                         "reference, triton"):
        resolve_backend(None, "cpu")
    with pytest.raises(ValueError, match=r"backend 'Triton' \(from the backend argument\) is not allowed"):
        quantized_linear(torch.randn(2, 128), torch.randn(4, 128), load_recipe("quest_w4a4"), backend="Triton")


def test_env_var_and_argument_pick_the_path(monkeypatch, triton_calls):
    recipe = load_recipe("quest_w4a4")
    x, w = torch.randn(3, 128).to(DEVICE), torch.randn(8, 128).to(DEVICE)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    quantized_linear(x, w, recipe)
    quantized_linear(x, w, recipe, backend="reference")
    monkeypatch.setenv(BACKEND_ENV, "reference")
    quantized_linear(x, w, recipe)
    quantized_linear(x, w, recipe, backend="triton")
    assert triton_calls == ["quest_w4a4", "quest_w4a4"]


def _compare(recipe: Recipe, shape: tuple[int, ...], out_features: int, seed: int, bias: bool = True) -> None:
    """Triton path vs reference on boundary-free inputs: y, g_x, g_w, g_b and stats within fp32 tolerance."""
    x = boundary_free(shape, [recipe.input], seed)
    w = boundary_free((out_features, shape[-1]), [recipe.weight], seed + 1, scale=shape[-1] ** -0.5)
    b = torch.randn(out_features) if bias else None
    g = torch.randn(*shape[:-1], out_features)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        stats: dict = {}
        y = quantized_linear(leaves[0], leaves[1], recipe, leaves[2] if bias else None, stats=stats, backend=backend)
        grads = torch.autograd.grad(y, leaves, g.to(DEVICE))
        results[backend] = ([y.detach().cpu()] + [t.cpu() for t in grads], stats)
    (want, want_stats), (got, got_stats) = results["reference"], results["triton"]
    for name, a, b_ in zip(("y", "grad_x", "grad_w", "grad_b"), got, want, strict=False):
        assert a.dtype == b_.dtype and a.shape == b_.shape, name
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5 * float(b_.abs().max()), msg=name)
    assert set(got_stats) == set(want_stats)
    for key in want_stats:
        assert float(got_stats[key]) == pytest.approx(float(want_stats[key]), abs=1e-6), key


@pytest.mark.parametrize(("name", "shape"), [
    ("quest_w4a4", (37, 256)), ("quest_w4a4", (2, 19, 128)), ("quest_w1a1", (37, 128)), ("quest_w2a2", (1, 256)),
    ("quest_w3a3", (37, 128)), ("ste_w4a4", (37, 200)), ("clip1_w4a4", (37, 128)), ("noht_w4a4", (37, 200)),
    ("quest_w4", (37, 256)), ("quest_w1", (2, 19, 128)), ("quest_w4_rotated", (37, 256)),
    ("quest_w1_rotated", (5, 128)),
])
def test_triton_path_equals_the_reference(name, shape, triton_calls):
    _compare(load_recipe(name), shape, 64, seed=len(name) + shape[-1])
    assert triton_calls == [name]


def test_mixed_bits_and_bf16_inputs(triton_calls):
    recipe = Recipe("w2a6", weight=TensorSpec(format="int2"), input=TensorSpec(format="int6"))
    _compare(recipe, (37, 128), 64, seed=3, bias=False)
    # bf16 activations (as under autocast): same codes, outputs equal up to one bf16 rounding.
    spec = load_recipe("quest_w4a4")
    x = boundary_free((37, 128), [spec.input], 4).bfloat16()
    w = torch.randn(64, 128) * 0.1
    y_ref = reference_linear(x, w, spec)
    y = quantized_linear(x.to(DEVICE), w.to(DEVICE), spec, backend="triton").cpu()
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2 * float(y_ref.abs().max()))
    assert triton_calls == ["w2a6", "quest_w4a4"]


@pytest.mark.parametrize("name", ["lsq_w4a4", "lsq_ht_w4a4", "absmax_w4a4", "quest_w8a8", "quest_fp4", "bf16",
                                  "quest_w4za4z", "quest_w4z"])
def test_unsupported_recipes_fall_back_to_the_reference(name, triton_calls):
    recipe = load_recipe(name)
    assert triton_unsupported_reason(recipe) is not None
    x, w = torch.randn(5, 128), torch.randn(16, 128)
    lsq_roles = [role for role in ("weight", "input") if getattr(recipe, role).learned_scale]
    scales = {f"{role}_lsq_scale": torch.ones(1) for role in lsq_roles}
    y = quantized_linear(x, w, recipe, backend="triton", **scales)
    assert torch.equal(y, reference_linear(x, w, recipe, **scales))
    assert triton_calls == []


def test_unsupported_dtypes_and_domains_fall_back(triton_calls):
    recipe = load_recipe("quest_w4a4")
    assert "input dtype torch.float64" in triton_unsupported_reason(recipe, torch.float64)
    mixed = Recipe("mixed", weight=TensorSpec(format="int4"), input=TensorSpec(format="int4", rotation="none"))
    assert "different domains" in triton_unsupported_reason(mixed)
    x, w = torch.randn(5, 128, dtype=torch.float64), torch.randn(16, 128, dtype=torch.float64)
    assert torch.equal(quantized_linear(x, w, recipe, backend="triton"), reference_linear(x, w, recipe))
    with pytest.raises(ValueError, match=r"x \(5, 128\) and weight \(16, 64\) do not fit"):
        quantized_linear(x, w[:, :64], recipe, backend="triton")
    assert triton_calls == []


def test_only_codes_steps_and_masks_are_saved_for_backward():
    recipe = load_recipe("quest_w4a4")
    m, k, n = 37, 256, 64
    w = torch.randn(n, k, device=DEVICE, requires_grad=True)
    saved: list[torch.Tensor] = []
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quantized_linear(x, w, recipe, backend="triton")
    assert {t.dtype for t in saved} == {torch.uint8, torch.float32}
    assert all(t.dtype == torch.uint8 or t.dim() == 1 for t in saved)  # fp32 only for the per-row steps

    def measured(tokens: int) -> int:
        x = torch.randn(tokens, k, device=DEVICE, requires_grad=True)
        return saved_tensor_bytes(lambda: quantized_linear(x, w, recipe, backend="triton"), exclude=[w])

    expected = saved_bytes_per_linear(m, k, n, recipe, dtype=torch.float32)
    assert measured(m) - measured(0) == expected.activation == m * (k // 2 + k // 8 + 4)
    assert measured(0) == expected.weight == n * (k // 2 + k // 8 + 4)
    plain = saved_tensor_bytes(lambda: torch.nn.functional.linear(x, w), exclude=[w])
    assert plain == expected.nn_linear == m * k * 4


def test_activation_memory_at_the_800m_shapes():
    tokens = 16384
    for k, n in ((2048, 2048), (2048, 5632), (2048, 6144), (5632, 2048)):
        w4a4 = saved_bytes_per_linear(tokens, k, n, load_recipe("quest_w4a4"))
        w1a1 = saved_bytes_per_linear(tokens, k, n, load_recipe("quest_w1a1"))
        assert w4a4.nn_linear == 2 * tokens * k  # the bf16 input
        assert w4a4.ratio == pytest.approx((k / 2 + k / 8 + 4) / (2 * k)) and w4a4.ratio <= 0.40
        assert w1a1.ratio == pytest.approx((k / 8 + k / 8 + 4) / (2 * k))
    assert saved_bytes_per_linear(tokens, 2048, 2048, load_recipe("quest_w4")).ratio == 1.0
    with pytest.raises(ValueError, match="runs on the reference path"):
        saved_bytes_per_linear(tokens, 2048, 2048, load_recipe("lsq_w4a4"))


def test_quant_linear_layer_uses_the_backend_switch(monkeypatch, triton_calls):
    recipe = load_recipe("quest_w4a4")
    layer = QuantLinear(128, 64, recipe=recipe).to(DEVICE)
    layer.track_stats = True
    x = boundary_free((2, 5, 128), [recipe.input], 9).to(DEVICE)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    want = layer(x)
    want_stats = dict(layer.stats)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    got = layer(x)
    assert triton_calls == ["quest_w4a4"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(layer.stats) == set(want_stats) == {"weight_masked_fraction", "input_masked_fraction"}


def losses_by_backend(tmp_path, extra: list[str], steps: int) -> dict[str, dict[int, float]]:
    """``{backend: {step: train/loss}}`` of two ``quest_w4a4`` runs on the same random-word corpus, one per backend
    (chosen by the ``backend`` config key), with ``extra`` overrides."""
    from bitlaw.train.cli import train

    corpus = word_corpus(tmp_path / "corpus.jsonl", docs=200, words=100)
    losses = {}
    for backend in ("reference", "triton"):
        run_dir = tmp_path / backend
        overrides = small_overrides(corpus, tmp_path / "cache", run_dir, "quest_w4a4") + extra
        overrides += [f"trainer.max_steps={steps}", "val_every=100", "val_batches=1", "ckpt_every=100",
                      f"backend={backend}"]
        train(compose_train(overrides))
        losses[backend] = train_losses(run_dir)
    assert sorted(losses["triton"]) == sorted(losses["reference"]) == list(range(steps))
    return losses


@pytest.mark.skipif(not INTERPRETED, reason="the CPU training config; the gpu test covers CUDA")
def test_few_training_steps_give_the_same_losses_with_either_backend(tmp_path, triton_calls):
    # 2 × 32 tokens per step keeps the interpreted kernels to seconds.
    losses = losses_by_backend(tmp_path, ["global_batch=2"], steps=4)
    assert set(triton_calls) == {"quest_w4a4"}
    # Step 0 is one forward from identical weights. Afterwards the two paths differ in float summation order
    # (sum of squares before vs after the rotation, numpy vs torch dots), so a value within an ulp of a rounding
    # boundary can land on the other level and the runs drift apart by a few 1e-4.
    assert losses["triton"][0] == pytest.approx(losses["reference"][0], rel=5e-5)
    for step, loss in losses["reference"].items():
        assert losses["triton"][step] == pytest.approx(loss, rel=1e-3), (step, losses)


def test_unknown_backend_in_the_config_fails_before_training(tmp_path):
    from bitlaw.train.cli import train

    overrides = small_overrides(tmp_path / "missing.jsonl", tmp_path / "cache", tmp_path / "run", "quest_w4a4")
    with pytest.raises(ValueError, match="backend='cuda' is not allowed; allowed: auto, reference, triton"):
        train(compose_train([*overrides, "backend=cuda"]))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_under_autocast_every_projection_takes_and_returns_bf16(monkeypatch, backend):
    """Operand flow under bf16 autocast (training's bf16-mixed): each quantized projection of a Llama receives
    bf16 activations (RMSNorm hands it fp32) and its fp32 master weight, and returns bf16, like nn.Linear."""
    from bitlaw.models.convert import convert, quantized_layers
    from bitlaw.models.llama import LlamaConfig, LlamaModel

    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    path = "_triton_linear" if backend == "triton" else "reference_linear"
    original = getattr(linear, path)

    def spy(x, weight, *args, **kwargs):
        out = original(x, weight, *args, **kwargs)
        seen.append((x.dtype, (weight[0] if isinstance(weight, list) else weight).dtype, out.dtype))
        return out

    monkeypatch.setattr(linear, path, spy)
    model = LlamaModel(LlamaConfig(n_layer=1, d_model=128, n_head=1, vocab_size=64, max_seq_len=16)).to(DEVICE)
    convert(model, load_recipe("quest_w4a4"))
    for layer in quantized_layers(model).values():
        layer.backend = backend
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, loss = model(tokens, tokens)
    loss.backward()
    # Four calls for seven projections: q/k/v share one quantized input, gate/up another.
    assert len(seen) == 4 and set(seen) == {(torch.bfloat16, torch.float32, torch.bfloat16)}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # Without autocast nothing is cast: fp32 in, fp32 out.
    seen.clear()
    model(tokens)
    assert set(seen) == {(torch.float32, torch.float32, torch.float32)}


def test_compiled_graph_keeps_the_triton_path_in_one_piece():
    """The Triton path is a torch.library operator: torch.compile traces through it without a graph break
    (fullgraph=True raises on one) and the compiled function computes what the eager one does."""
    recipe = load_recipe("quest_w4a4")
    x = boundary_free((37, 128), [recipe.input], 31).to(DEVICE)
    w = boundary_free((64, 128), [recipe.weight], 32, scale=128**-0.5).to(DEVICE)

    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return quantized_linear(a, b, recipe, backend="triton")

    def run(fn) -> tuple[torch.Tensor, ...]:
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(a, b)
        y.square().sum().backward()  # the compiled graph's backward calls the operator's registered formula
        return y.detach(), a.grad, b.grad

    torch._dynamo.reset()
    got = run(torch.compile(forward, fullgraph=True, backend="aot_eager"))
    for a, b in zip(got, run(forward), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_select_backend_names_the_path_and_why():
    from bitlaw.kernels.linear import select_backend

    recipe = load_recipe("quest_w4a4")
    x, w = torch.randn(2, 128).to(DEVICE), torch.randn(4, 128).to(DEVICE)
    assert select_backend(recipe, x, w, "triton") == linear.BackendChoice("triton", None)
    assert select_backend(recipe, x, w, "reference").reason == "backend=reference requested (the backend argument)"
    choice = select_backend(load_recipe("lsq_w4a4"), x, w, "triton")
    assert choice.backend == "reference" and choice.reason.startswith("no Triton kernel: weight: scale 'lsq_step'")
    zero = ("format 'int4z' is an integer grid with a zero level (int{b}z/int{b}s); the kernels implement only "
            "QuEST's odd grids int1 … int7")
    choice = select_backend(load_recipe("quest_w4za4z"), x, w, "triton")
    assert choice == linear.BackendChoice("reference", f"no Triton kernel: weight: {zero}")
    odd_weight = Recipe("w4a4z", weight=TensorSpec(format="int4"), input=TensorSpec(format="int4z"))
    assert triton_unsupported_reason(odd_weight) == f"input: {zero}"
    if DEVICE == "cuda":
        assert select_backend(load_recipe("quest_w4z"), x, w, "auto").reason == f"no Triton kernel: weight: {zero}"
    if DEVICE == "cpu":
        auto = select_backend(recipe, x, w, "auto")
        assert auto == linear.BackendChoice("reference", "backend=auto on cpu tensors (the Triton kernels run on CUDA)")
