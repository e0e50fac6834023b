"""lorafit: fine-tune a small open LLM into a domain expert with LoRA/QLoRA."""

__version__ = "0.1.0"
