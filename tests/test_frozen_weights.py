"""weights_cast_once: frozen linear weights cast to bf16 once under CPU bf16 autocast."""

import torch
from peft import LoraConfig, get_peft_model

from lorafit.frozen_weights import weights_cast_once
from lorafit.lora_layer import FusedLoraLinear


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)
        self.head = torch.nn.Linear(16, 50, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def _lora_net():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    cfg._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return get_peft_model(_Net(), cfg)


def _step(model, x):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a hidden state, not a leaf: autocast caches the casts of leaves that require grad
        out = model(x * 1.0)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad.clone()


def _casts(fn):
    """The shapes of the 2-D fp32 tensors ``fn`` copies to bf16 (weights: activations are 3-D)."""
    seen = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func is torch.ops.aten._to_copy.default
                and kwargs.get("dtype") is torch.bfloat16
                and args[0].dim() == 2
                and args[0].dtype == torch.float32
            ):
                seen.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    with Count():
        fn()
    return seen


def test_bit_identical_outputs_and_gradients():
    model = _lora_net()
    x = torch.randn(3, 7, 16, requires_grad=True)
    out, grads, x_grad = _step(model, x)
    assert grads, "the adapter trains"
    x.grad = None
    with weights_cast_once(model):
        out2, grads2, x_grad2 = _step(model, x)
    assert out2.dtype == torch.bfloat16
    assert torch.equal(out, out2)
    assert torch.equal(x_grad, x_grad2)
    assert grads.keys() == grads2.keys()
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)


def test_frozen_weights_cast_once_per_block_and_freed_after():
    model = _lora_net()
    x = torch.randn(2, 5, 16)
    frozen = [
        m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad
    ]
    assert len(frozen) == 3  # up's and down's base layers, the head

    def two_forwards():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
            model(x)

    plain = _casts(two_forwards)
    with weights_cast_once(model):
        once = _casts(two_forwards)
        again = _casts(two_forwards)
    # autocast casts the three frozen weights (and the trainable adapter's, which it caches)
    # on every forward; inside the block the frozen ones are cast once, then never again
    frozen_shapes = sorted(tuple(m.weight.shape) for m in frozen)
    assert sorted(s for s in plain if s in frozen_shapes) == sorted(frozen_shapes * 2)
    assert sorted(s for s in once if s in frozen_shapes) == frozen_shapes
    assert [s for s in again if s in frozen_shapes] == []
    assert all(not any(k.startswith("_lorafit") for k in m.__dict__) for m in frozen)
    assert all("forward" not in m.__dict__ for m in frozen)


def test_recast_when_a_weight_changes_in_place():
    model = _lora_net()
    x = torch.randn(2, 5, 16)
    head = model.base_model.model.head
    with torch.no_grad(), weights_cast_once(model), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
        head.weight.mul_(2)
        after = model(x)
    torch.testing.assert_close(after.float(), 2 * before.float(), rtol=1e-2, atol=1e-2)


def test_own_forward_outside_bf16_autocast_and_for_weights_that_train():
    model = _lora_net()
    head = model.base_model.model.head
    head.weight.requires_grad_(True)  # a trainable head: autocast's to cast
    x = torch.randn(2, 5, 16)

    def two_autocast_blocks():
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)

    with torch.no_grad():
        expect = model(x)
        with weights_cast_once(model):
            assert "forward" not in head.__dict__
            assert torch.equal(model(x), expect)  # fp32: the layers' own forward
            shapes = _casts(two_autocast_blocks)
    assert shapes.count((50, 16)) == 2  # the trainable head: once per autocast block
    assert shapes.count((32, 16)) == 1  # up's frozen base layer: once for the whole block


def test_a_layer_that_starts_training_inside_the_block_is_cast_by_autocast_again():
    model = _lora_net()
    head = model.base_model.model.head
    x = torch.randn(2, 5, 16)

    def two_autocast_blocks():
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)

    with torch.no_grad(), weights_cast_once(model):
        assert "forward" in head.__dict__  # frozen when the block began
        assert _casts(two_autocast_blocks).count((50, 16)) == 1
        head.weight.requires_grad_(True)
        assert _casts(two_autocast_blocks).count((50, 16)) == 2  # autocast's, per block


def test_generation_of_a_frozen_model_casts_each_weight_once_with_the_same_answers(
    tiny_model_dir, monkeypatch
):
    """inference.generate under bf16 autocast: a frozen model (as evaluation's tuned model is)
    casts its linear weights once for the call, not at every token, and answers the same."""
    import contextlib

    from lorafit import frozen_weights
    from lorafit.inference import chat_prompt, generate, load_for_inference

    loaded = load_for_inference(tiny_model_dir, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    prompts = [chat_prompt(q, None) for q in ("Hi", "What is 1+1?", "Name three colors.")]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    shapes = {tuple(m.weight.shape) for m in linears}

    def run():
        """(answers, the weight-shaped fp32 -> bf16 casts the call made)"""
        out = []
        casts = _casts(lambda: out.extend(generate(model, tok, prompts, 8, precision="bf16")))
        return [text for text, _ in out], [s for s in casts if s in shapes]

    answers_once, once = run()
    monkeypatch.setattr(frozen_weights, "weights_cast_once", lambda m: contextlib.nullcontext())
    answers_every, every = run()
    assert answers_once == answers_every
    assert len(once) == len(linears)  # each weight once
    assert len(every) >= 8 * len(linears)  # autocast: at every step (the prompt, 7 new tokens)
