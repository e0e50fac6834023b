"""FusedLoraLinear: peft's LoRA maths with the adapter's add folded into one matmul."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafit.lora_layer import FusedLoraLinear


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 20)
        self.down = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(alpha=3, dropout=0.0):
    """The same weights wrapped by peft's own LoRA layer and by FusedLoraLinear."""
    torch.manual_seed(0)
    base = _Mlp()

    def config():
        return LoraConfig(
            r=4,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=["up", "down"],
            init_lora_weights=False,
        )

    fused_cfg = config()
    fused_cfg._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    plain = get_peft_model(_Mlp(), config())
    fused = get_peft_model(_Mlp(), fused_cfg)
    for model in (plain, fused):
        model.base_model.model.load_state_dict(base.state_dict(), strict=False)
    fused.load_state_dict(plain.state_dict())
    assert isinstance(fused.base_model.model.up, FusedLoraLinear)
    assert not isinstance(plain.base_model.model.up, FusedLoraLinear)
    return plain, fused


def _run(model, x):
    model.zero_grad()
    out = model(x)
    (out**2).sum().backward()
    return out.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_same_outputs_and_gradients_as_peft():
    plain, fused = _pair(alpha=3)  # scaling 0.75: not exact in binary, so rounding may differ
    x = torch.randn(2, 5, 12, requires_grad=True)
    out_plain, grads_plain = _run(plain, x)
    out_fused, grads_fused = _run(fused, x)
    torch.testing.assert_close(out_fused, out_plain)
    assert grads_plain.keys() == grads_fused.keys() and len(grads_plain) == 4
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fused[name], grad, msg=name)


def test_the_fused_path_is_taken_and_can_fail(monkeypatch):
    """A wrong scaling in the fused path shows up against peft's (the comparison can fail)."""
    plain, fused = _pair()
    x = torch.randn(3, 12)
    original = FusedLoraLinear._plain_adapter
    calls = []

    def spy(self, *args):
        calls.append(original(self, *args))
        return calls[-1]

    monkeypatch.setattr(FusedLoraLinear, "_plain_adapter", spy)
    fused.base_model.model.up.scaling["default"] *= 2
    with torch.no_grad():
        assert not torch.allclose(fused(x), plain(x))
    assert calls == ["default", "default"]


@pytest.mark.parametrize("case", ["merged", "disabled", "dropout"])
def test_unusual_states_match_peft(case):
    plain, fused = _pair(dropout=0.3 if case == "dropout" else 0.0)
    x = torch.randn(3, 12)
    if case == "merged":
        for model in (plain, fused):
            model.merge_adapter()
    if case == "dropout":  # the same dropout mask on both sides
        torch.manual_seed(5)
        a = plain(x)
        torch.manual_seed(5)
        b = fused(x)
    elif case == "disabled":
        with plain.disable_adapter(), fused.disable_adapter():
            a, b = plain(x), fused(x)
    else:
        a, b = plain(x), fused(x)
    torch.testing.assert_close(b, a)


def test_full_precision_models_get_the_fused_layer(tiny_model_dir):
    """(A real 4-bit and 8-bit model keeping peft's own layers: test_reliability.py's
    quantized training test.)"""
    from lorafit.config import LoraSection, ModelSection
    from lorafit.model import load_model, lora_config

    model = load_model(ModelSection(name=str(tiny_model_dir)), device="cpu")
    assert lora_config(LoraSection(), model)._custom_modules == {torch.nn.Linear: FusedLoraLinear}
