"""The answer-only loss and its shared-prefix form: same loss, same gradients, fewer FLOPs."""

import pytest
import torch

from lorafit.data.formats import Example
from lorafit.data.tokenize import tokenize_example
from lorafit.loss import IGNORE, answer_only_loss, shared_prefix_length

QUESTIONS = [
    ("What is EEC?", "EEC stands for Electronic Engine Control."),
    ("Explain what APU means.", "APU stands for Auxiliary Power Unit, a small turbine."),
    ("Define MRO, please", "MRO stands for Maintenance, Repair and Overhaul."),
    ("What does BER mean?", "BER stands for Beyond Economical Repair."),
]


def _packed(tokenizer, pairs):
    """One padding-free row (what TRL's padding-free collator builds) with position ids."""
    ids, labels, positions = [], [], []
    for prompt, response in pairs:
        example = Example(prompt=({"role": "user", "content": prompt},), answer=response)
        row, _ = tokenize_example(tokenizer, example, 256, None)
        ids += row.input_ids
        labels += [IGNORE, *row.labels[1:]]
        positions += list(range(len(row.input_ids)))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).train()


def _loss_and_grads(model, batch, shared):
    model.zero_grad()
    loss, count = answer_only_loss(model, batch, shared_prefix=shared)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), count, grads


def test_shared_prefix_gives_the_same_loss_and_gradients(lora_model, tokenizer):
    batch = _packed(tokenizer, QUESTIONS)
    prefix, spans = shared_prefix_length(batch["input_ids"], batch["labels"], batch["position_ids"])
    # the whole system prompt and the user turn's opening tokens are shared
    system = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert prefix >= len(tokenizer(system.split("user")[0])["input_ids"])
    assert len(spans) == len(QUESTIONS)

    plain, n_plain, grads_plain = _loss_and_grads(lora_model, batch, shared=False)
    shared, n_shared, grads_shared = _loss_and_grads(lora_model, batch, shared=True)
    assert n_plain == n_shared == int((batch["labels"] != IGNORE).sum())
    assert torch.allclose(plain, shared, rtol=1e-5)
    assert len(grads_plain) == len(grads_shared) > 0
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name  # every adapter weight gets a gradient
        relative = (grad - grads_shared[name]).norm() / grad.norm()
        assert relative < 1e-4, (name, relative)


def _grid(rows=6, heads=9, kv_heads=3, length=20, prefix=8, dim=16, seed=0):
    """Query, key, value and mask of a rows grid with rows of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, length, dim, generator=gen, requires_grad=True)
    k = torch.randn(rows, kv_heads, prefix + length, dim, generator=gen, requires_grad=True)
    v = torch.randn(rows, kv_heads, prefix + length, dim, generator=gen, requires_grad=True)
    cells = torch.arange(length)
    lengths = torch.linspace(3, length, rows).long()
    own = (cells[None, :] <= cells[:, None])[None] & (cells[None] < lengths[:, None])[:, None, :]
    mask = torch.cat([torch.ones(rows, length, prefix, dtype=torch.bool), own], 2)[:, None]
    return q, k, v, mask


def _attention_and_grads(fn, q, k, v, mask, bf16: bool):
    for t in (q, k, v):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = fn(q, k, v, mask)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach().float(), [t.grad.clone() for t in (q, k, v)]


def test_rows_attention_multiplied_out_under_cpu_autocast_matches_sdpa():
    """attend_rows' matmul attention (CPU bf16 autocast) gives SDPA's attention and gradients
    in float32 up to bf16 rounding, with grouped key/value heads and padded rows."""
    from lorafit import loss

    def sdpa(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        )

    grid = _grid()
    want, want_grads = _attention_and_grads(sdpa, *grid, bf16=False)
    got, got_grads = _attention_and_grads(loss.attend_rows, *grid, bf16=True)
    assert (got - want).abs().max() < 0.05
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g - w).norm() / w.norm() < 0.02
    # the tolerance tells groupings apart: query heads on the wrong key/value heads are far off
    q, k, v, mask = grid
    k, v = (t[:, [1, 2, 0]].detach().requires_grad_() for t in (k, v))
    rotated, _ = _attention_and_grads(sdpa, q, k, v, mask, bf16=False)
    assert (rotated - want).abs().max() > 0.2


def test_shared_prefix_under_bf16_autocast_stays_as_near_float32_as_the_plain_pass(
    lora_model, tokenizer
):
    """The matmul attention in a real shared-prefix pass under bf16 autocast (the trainer
    checks sharing in fp32, where SDPA runs): loss and gradients as near the float32 ones as
    the plain bf16 pass's, within a factor of two (this random model amplifies rounding: the
    plain bf16 pass's gradients are ~18% off float32's)."""
    batch = _packed(tokenizer, QUESTIONS)
    exact, _, grads = _loss_and_grads(lora_model, batch, shared=False)

    def off(shared: bool) -> tuple[float, float]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, got = _loss_and_grads(lora_model, batch, shared=shared)
        worst = max(float((got[n] - g).norm() / g.norm()) for n, g in grads.items())
        return abs(float(loss - exact)) / float(exact), worst

    (plain_loss, plain_grads), (shared_loss, shared_grads) = off(False), off(True)
    assert shared_loss < max(2 * plain_loss, 1e-3)
    assert shared_grads < 2 * plain_grads


def test_rows_attention_keeps_sdpa_in_float32_and_for_long_grids(monkeypatch):
    """fp32 (where SDPA is as fast) and grids over the score budget (memory) take SDPA itself."""
    from lorafit import loss

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        loss.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    )
    grid = _grid()
    _attention_and_grads(loss.attend_rows, *grid, bf16=False)
    assert len(calls) == 1
    _attention_and_grads(loss.attend_rows, *grid, bf16=True)
    assert len(calls) == 1  # multiplied out
    monkeypatch.setattr(loss, "MATMUL_ATTENTION_MAX_SCORES", 100)
    _attention_and_grads(loss.attend_rows, *grid, bf16=True)
    assert len(calls) == 2


def test_a_wrong_mask_would_be_caught(lora_model, tokenizer, monkeypatch):
    """The comparison above can fail: drop the prefix from the rows' view and it differs."""
    import lorafit.loss as loss_module

    batch = _packed(tokenizer, QUESTIONS)
    plain, _, _ = _loss_and_grads(lora_model, batch, shared=False)
    real = loss_module.RowLayout.of

    def blind(spans, prefix, device):
        layout = real(spans, prefix, device)
        layout.mask[..., :prefix] = False
        return layout

    monkeypatch.setattr(loss_module.RowLayout, "of", blind)
    broken, _, _ = _loss_and_grads(lora_model, batch, shared=True)
    assert not torch.allclose(plain, broken, rtol=1e-5)


def test_shared_prefix_works_whatever_attention_the_model_uses(tiny_model_dir, tokenizer):
    """The suffix pass always attends row by row, so an eager-attention model gets the same
    loss with and without sharing, and keeps its own attention afterwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config).train()
    batch = _packed(tokenizer, QUESTIONS)
    plain, _, grads_plain = _loss_and_grads(model, batch, shared=False)
    shared, _, grads_shared = _loss_and_grads(model, batch, shared=True)
    assert torch.allclose(plain, shared, rtol=1e-5)
    assert len(grads_plain) == len(grads_shared) > 0  # it trains the same, not only scores so
    for name, grad in grads_plain.items():
        relative = (grad - grads_shared[name]).norm() / grad.norm()
        assert relative < 1e-4, (name, relative)
    assert model.get_base_model().config._attn_implementation == "eager"


def test_prefix_stops_before_any_answer_and_needs_two_rows(tokenizer):
    batch = _packed(tokenizer, QUESTIONS)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    full, spans = shared_prefix_length(ids, labels, positions)
    start, end = spans[1]
    # a row whose labels start early pulls the shared prefix back before them
    early = labels.clone()
    early[0, start + full - 3] = ids[0, start + full - 3]
    assert shared_prefix_length(ids, early, positions)[0] == full - 4
    # one row: nothing to share; no position ids (a padded batch): nothing to share
    one = _packed(tokenizer, QUESTIONS[:1])
    assert shared_prefix_length(one["input_ids"], one["labels"], one["position_ids"])[0] == 0
    assert shared_prefix_length(ids, labels, None)[0] == 0
    # rows that differ from the first token share nothing
    other = ids.clone()
    other[0, start] = other[0, start] + 1
    assert shared_prefix_length(other, labels, positions)[0] == 0


def _train_tiny(tmp_path, tiny_model_dir, name: str, **extra) -> dict:
    """Three steps on the tiny model with packed 4-row batches; the run's run.json."""
    from conftest import write_jsonl

    from lorafit.config import load_config
    from lorafit.rundir import read_json
    from lorafit.train import train

    data = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in QUESTIONS * 2]
    )
    sets = {
        "model.name": str(tiny_model_dir),
        "data.train": str(data),
        "output_dir": str(tmp_path / name),
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "tracking.enabled": "false",
        **extra,
    }
    run = train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    return read_json(run / "run.json")


def test_training_uses_the_shared_prefix_after_checking_it(tmp_path, tiny_model_dir):
    results = _train_tiny(tmp_path, tiny_model_dir, "run")["results"]
    assert results["shared_prefix"] == 1 and results["shared_prefix_tokens"] >= 8
    off = _train_tiny(tmp_path, tiny_model_dir, "off", **{"train.shared_prefix": "false"})
    assert off["results"]["shared_prefix"] == 0


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_training_falls_back_when_the_shared_loss_differs(
    tmp_path, tiny_model_dir, monkeypatch, caplog, failure
):
    """A model whose attention would treat the shared prefix differently (another loss, or an
    error): the first-batch check warns, and the run trains without sharing (never on the
    wrong loss)."""
    import lorafit.loss

    real = lorafit.loss._shared_prefix_loss
    calls = []

    def off_by_a_bit(*args, **kwargs):
        calls.append(1)
        if failure == "raises":
            raise RuntimeError("this attention takes no custom mask")
        loss, count = real(*args, **kwargs)
        return loss * 1.01, count

    monkeypatch.setattr(lorafit.loss, "_shared_prefix_loss", off_by_a_bit)
    with caplog.at_level("WARNING"):
        info = _train_tiny(tmp_path, tiny_model_dir, "run")
    assert info["status"] == "completed" and info["results"]["shared_prefix"] == 0
    assert "training without sharing" in caplog.text
    assert len(calls) == 1  # only the check used it; the 3 training steps did not


# -- replay distillation (data.replay_kl) ------------------------------------------------------


def _kl_setup(tiny_model_dir, tokenizer, init_zero: bool):
    """A LoRA model, a packed batch of QUESTIONS, and each row's base distributions taken
    from the model before the adapter (what training does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.data.prepare import base_distributions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = []
    for prompt, response in QUESTIONS:
        example = Example(prompt=({"role": "user", "content": prompt},), answer=response)
        rows.append(tokenize_example(tokenizer, example, 256, None)[0])
    teachers = base_distributions(model, rows, k=16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init_zero)
    return get_peft_model(model, config).train(), _packed(tokenizer, QUESTIONS), teachers


def _kl_term(model, batch, teachers, shared: bool) -> float:
    from lorafit.loss import Teacher

    teacher = Teacher.for_batch(teachers, batch["input_ids"], batch["position_ids"], 1.0)
    with torch.no_grad():
        with_kl, _ = answer_only_loss(model, batch, shared_prefix=shared, teacher=teacher)
        without, _ = answer_only_loss(model, batch, shared_prefix=shared)
    return float(with_kl - without)


def test_replay_kl_is_zero_for_the_base_model_and_grows_as_the_model_moves(
    tiny_model_dir, tokenizer
):
    model, batch, teachers = _kl_setup(tiny_model_dir, tokenizer, init_zero=True)
    from lorafit.loss import Teacher

    teacher = Teacher.for_batch(teachers, batch["input_ids"], batch["position_ids"], 1.0)
    answer_positions = int((batch["labels"] != IGNORE).sum())
    assert int(teacher.mask.sum()) == answer_positions  # every answer token of every row
    # a fresh adapter (B = 0) is the base model: nothing to distil
    assert abs(_kl_term(model, batch, teachers, shared=False)) < 1e-4
    moved, *_ = _kl_setup(tiny_model_dir, tokenizer, init_zero=False)
    kl = _kl_term(moved, batch, teachers, shared=False)
    assert kl > 1e-3
    # the one-pass shared prefix keeps the same teacher positions
    assert _kl_term(moved, batch, teachers, shared=True) == pytest.approx(kl, rel=1e-3)


def test_base_distributions_batched_equal_one_row_at_a_time(tiny_model_dir, tokenizer):
    """Rows of different lengths go through the base model together, right-padded: their
    top tokens and log-probabilities are those of one forward per row."""
    from transformers import AutoModelForCausalLM

    from lorafit.data.prepare import base_distributions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = []
    for prompt, response in QUESTIONS:
        example = Example(prompt=({"role": "user", "content": prompt},), answer=response)
        rows.append(tokenize_example(tokenizer, example, 256, None)[0])
    assert len({len(r.input_ids) for r in rows}) > 1
    alone = base_distributions(model, rows + rows[:1], k=16, batch=1)  # a repeat counts once
    together = base_distributions(model, rows, k=16, batch=16)
    assert alone.keys() == together.keys() and len(together) == len(rows)
    for key, teacher in alone.items():
        assert torch.equal(teacher.positions, together[key].positions)
        assert torch.equal(teacher.ids, together[key].ids)
        # stored in float16: one step near -11 is 2**-7, so allow one
        assert torch.allclose(teacher.logp.float(), together[key].logp.float(), atol=1e-2)


def test_replay_kl_pulls_the_model_back_towards_the_base(tiny_model_dir, tokenizer):
    """A gradient step on the KL term alone lowers it: the term restores the base model's
    distribution instead of only adding a constant."""
    from lorafit.loss import Teacher

    model, batch, teachers = _kl_setup(tiny_model_dir, tokenizer, init_zero=False)
    before = _kl_term(model, batch, teachers, shared=False)
    teacher = Teacher.for_batch(teachers, batch["input_ids"], batch["position_ids"], 1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        with_kl, _ = answer_only_loss(model, batch, teacher=teacher)
        plain, _ = answer_only_loss(model, batch)
        (with_kl - plain).backward()
        optimizer.step()
    assert _kl_term(model, batch, teachers, shared=False) < 0.8 * before


def test_a_row_without_a_teacher_gets_no_kl_term(tiny_model_dir, tokenizer):
    from lorafit.loss import Teacher

    model, batch, teachers = _kl_setup(tiny_model_dir, tokenizer, init_zero=False)
    first = next(iter(teachers))
    only_first = {first: teachers[first]}
    teacher = Teacher.for_batch(only_first, batch["input_ids"], batch["position_ids"], 1.0)
    assert int(teacher.mask.sum()) == len(teachers[first].positions)
    assert not teacher.mask[0, len(first) :].any()
    assert Teacher.for_batch({}, batch["input_ids"], batch["position_ids"], 1.0) is None


def test_training_distils_the_replay_rows(tmp_path, tiny_model_dir, monkeypatch):
    """With replay rows in the mix, the KL term reaches their answer positions in training
    (the rows TRL hands the loss are the rows whose distributions were taken)."""
    import lorafit.data.replay

    def canned(model, tokenizer, key, prompts_file, system_prompt, **kwargs):
        return [
            {"prompt": p, "response": r, "stopped": True}
            for p, r in [("Name a colour.", "Blue."), ("Say hi.", "Hi there!")]
        ]

    monkeypatch.setattr(lorafit.data.replay, "base_answers", canned)
    info = _train_tiny(tmp_path, tiny_model_dir, "kl", **{"data.replay": 0.5})  # the default
    assert info["data"]["replay"]["kl_rows"] == 2
    assert info["results"]["kl_positions"] > 0
    off = _train_tiny(tmp_path, tiny_model_dir, "nokl", **{"data.replay": 0.5, "data.replay_kl": 0})
    assert off["results"]["kl_positions"] == 0 and "kl_rows" not in off["data"]["replay"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_runs_the_loss_in_the_precision_asked(
    tmp_path, tiny_model_dir, monkeypatch, precision
):
    """accelerate autocasts only the wrapped model's forward; lorafit's loss calls the inner
    model, so the trainer must enter autocast itself (it once trained in fp32 while run.json
    said bf16)."""
    import lorafit.trainer

    real, seen = lorafit.trainer.answer_only_loss, []

    def recording(model, inputs, *args, **kwargs):
        if model.training:
            on = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(lorafit.trainer, "answer_only_loss", recording)
    info = _train_tiny(tmp_path, tiny_model_dir, precision, **{"train.precision": precision})
    assert info["status"] == "completed" and len(seen) == 3
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
