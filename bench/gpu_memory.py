"""GPU memory: the planner's prediction vs torch.cuda.max_memory_allocated for QLoRA steps.

    python bench/gpu_memory.py                      # a CUDA machine: TinyLlama-1.1B's config
    python bench/gpu_memory.py --tiny --device cpu  # plumbing check anywhere (a tiny config)

No download: the model is TinyLlama-1.1B-Chat-v1.0's exact config with random weights, saved
once as bf16 safetensors, then loaded the way ``configs/tinyllama-qlora-4gb.yaml`` loads it
(``lorafit.model.load_model``: 4-bit NF4, double quantization). LoRA from the same config
(r16, all linear layers), adapter weights in bf16 as TRL does for quantized bases, gradient
checkpointing, lorafit's answer-only loss on random token ids (half of each row is "answer"),
AdamW, batch 1, three optimizer steps at each length. The peak is compared with
``lorafit estimate``'s GPU peak minus its CUDA-context allowance (which max_memory_allocated
does not see). Writes bench/gpu_memory.json and bench/gpu_memory.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tinyllama-qlora-4gb.yaml"
# TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json (the fields that size memory)
TINYLLAMA = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY = {**TINYLLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2)
GiB = 2**30


def random_model_dir(work: Path, shape: dict) -> Path:
    """Random weights with the given config, saved once (safetensors, bf16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = work / ("tinyllama-random" if shape is TINYLLAMA else "tiny-random")
    if (target / "config.json").is_file():
        return target
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    return target


def measure(model_dir: Path, length: int, device: str, steps: int = 3) -> dict:
    import torch
    from peft import get_peft_model

    from lorafit.config import load_config
    from lorafit.estimate import CUDA_CONTEXT_BYTES, estimate, shape_from_config
    from lorafit.loss import IGNORE, answer_only_loss
    from lorafit.model import load_model, lora_config

    cfg = load_config(PRESET, [f"model.name={model_dir}", f"data.max_length={length}"])
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(cfg.model, model_dir, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(cfg.lora, model))
    model.enable_input_require_grads()
    for param in model.parameters():
        if param.requires_grad:  # TRL keeps QLoRA adapters in bf16 (QLoRA paper, section 3)
            param.data = param.data.to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
        labels = ids.clone()
        labels[:, : length // 2] = IGNORE
        batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
        with autocast:
            loss, _ = answer_only_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated() if cuda else None
    shape = shape_from_config(model.config)
    planned = estimate(cfg, shape, "cuda", "bfloat16", length)
    predicted = planned.gpu_peak_bytes - int(CUDA_CONTEXT_BYTES)
    del model, optimizer
    return {
        "length": length,
        "device": device,
        "predicted_allocated_bytes": predicted,
        "predicted_gpu_peak_bytes": planned.gpu_peak_bytes,
        "measured_max_allocated_bytes": measured,
        "error": (predicted / measured - 1) if measured else None,
        "losses": losses,
        "seconds_per_step": elapsed / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (plumbing check)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-memory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="folder for results")
    a = parser.parse_args()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --tiny --device cpu")
    model_dir = random_model_dir(a.work, TINY if a.tiny else TINYLLAMA)
    results = []
    for length in a.lengths:
        r = measure(model_dir, length, a.device)
        print(json.dumps(r), flush=True)
        results.append(r)
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_memory.json").write_text(json.dumps({"gpu": gpu, "runs": results}, indent=1))
    lines = [
        f"QLoRA 4-bit, {'tiny config' if a.tiny else 'TinyLlama-1.1B config'}, batch 1, "
        f"gradient checkpointing, on {gpu}",
        "",
        "| length | predicted (allocator) | measured max_memory_allocated | error | "
        "predicted GPU peak incl. context |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        measured = r["measured_max_allocated_bytes"]
        lines.append(
            f"| {r['length']} | {r['predicted_allocated_bytes'] / GiB:.2f} GiB | "
            + (f"{measured / GiB:.2f} GiB | {r['error']:+.0%}" if measured else "n/a | n/a")
            + f" | {r['predicted_gpu_peak_bytes'] / GiB:.2f} GiB |"
        )
    (a.out / "gpu_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
